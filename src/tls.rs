//! The one TLS crypto provider of the process: rustls with ring, for
//! `rediss://` and for webhook endpoints over https (ring builds without
//! cmake or a Go toolchain, unlike aws-lc-rs).

/// Installs ring as the process's rustls provider; does nothing when one
/// is installed already.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
