//! `/docs`: the API reference in a browser, Swagger UI 5.32.6 (Apache-2.0)
//! from the `utoipa-swagger-ui` crate's vendored copy, embedded in the
//! binary so it works air-gapped (no CDN, nothing fetched at build time).
//! It reads the same `/openapi.json` the server serves, and "Try it out"
//! sends calls to this tracker with the token given under "Authorize".

use std::borrow::Cow;
use std::sync::{Arc, LazyLock};

use actix_web::http::header;
use actix_web::web::Bytes;
use actix_web::{HttpResponse, web};

use super::PageError;

/// Swagger UI's settings: the document, no call to the public validator
/// (air-gapped, and the document is checked in CI), operations folded.
static CONFIG: LazyLock<Arc<utoipa_swagger_ui::Config<'static>>> = LazyLock::new(|| {
    Arc::new(
        utoipa_swagger_ui::Config::from("/openapi.json")
            .validator_url("none")
            .doc_expansion("list")
            .try_it_out_enabled(false)
            .display_request_duration(true),
    )
});

/// Swagger UI renders with inline style attributes and data: images, so
/// its pages relax the pages' policy for those two, and only those.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
     img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; \
     base-uri 'none'";

/// `/docs` → `/docs/`: Swagger UI's files are named relative to it.
pub(super) async fn redirect() -> HttpResponse {
    HttpResponse::PermanentRedirect()
        .insert_header((header::LOCATION, "/docs/"))
        .finish()
}

/// `/docs/{file}`: Swagger UI's page and files.
pub(super) async fn serve(file: web::Path<String>) -> Result<HttpResponse, PageError> {
    let found = utoipa_swagger_ui::serve(&file, CONFIG.clone())
        .map_err(|e| PageError::internal(format!("Swagger UI's settings: {e}")))?;
    let Some(found) = found else {
        return Err(PageError::not_found());
    };
    let bytes = match found.bytes {
        // The page's title names this API rather than the viewer.
        Cow::Borrowed(page) if found.content_type == "text/html" && !found.gzpipped => Bytes::from(
            String::from_utf8_lossy(page)
                .replace("<title>Swagger UI</title>", "<title>headroom API</title>"),
        ),
        // The embedded files as they are, not copied per request.
        Cow::Borrowed(file) => Bytes::from_static(file),
        Cow::Owned(file) => Bytes::from(file),
    };
    // Swagger UI's files are UTF-8; say so rather than leave it to a guess.
    let content_type = if found.content_type.starts_with("text/") {
        format!("{}; charset=utf-8", found.content_type)
    } else {
        found.content_type
    };
    let mut answer = HttpResponse::Ok();
    answer
        .content_type(content_type)
        .insert_header((header::CONTENT_SECURITY_POLICY, POLICY))
        .insert_header((header::CACHE_CONTROL, "public, max-age=3600"));
    if found.gzpipped {
        answer.insert_header((header::CONTENT_ENCODING, "gzip"));
    }
    Ok(answer.body(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The initializer names this server's document and no validator.
    #[test]
    fn the_initializer_reads_this_servers_document() {
        let js = utoipa_swagger_ui::serve("swagger-initializer.js", CONFIG.clone())
            .expect("settings encode")
            .expect("the initializer is embedded");
        let js = String::from_utf8(js.bytes.into_owned()).expect("UTF-8");
        assert!(js.contains(r#""url": "/openapi.json""#), "{js}");
        assert!(js.contains(r#""validatorUrl": "none""#), "{js}");
    }
}
