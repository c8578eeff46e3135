//! Pages for people: the customer's usage page under `/portal/`, opened
//! with a signed link, and the vendor's console under `/console`, opened
//! with an admin token. Rendered on the server with askama (auto-escaped),
//! charts drawn by the vendored uPlot from a JSON island; every chart's
//! numbers are also in a table, so the pages work without JavaScript.

mod assets;
mod console;
mod csv;
mod data;
mod docs;
pub mod links;
mod portal;
pub mod sign;

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::http::header::{self, HeaderValue};
use actix_web::middleware::DefaultHeaders;
use actix_web::web::{self, ServiceConfig};
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use askama::Template;
use governor::{DefaultKeyedRateLimiter, Quota};

use super::problem::ApiError;
use sign::Signer;

/// Settings of the pages and their links.
#[derive(clap::Args, Clone, Debug)]
pub struct PageSettings {
    /// Comma-separated keys (at least 16 characters each) that sign portal
    /// and console links; the first signs, all are accepted, so a new key
    /// goes first and the old one stays until its links expired. Default:
    /// derived from --cluster-secret when set (every node agrees), else
    /// generated at start (links then end with the process).
    #[arg(long, env = "HEADROOM_PORTAL_SECRETS", hide_env_values = true, value_parser = secrets)]
    pub portal_secrets: Option<Secrets>,
    /// The address people reach headroom at (e.g. https://licences.example.com):
    /// links are absolute with it, and cookies `Secure` when it is https.
    #[arg(long, env = "HEADROOM_PUBLIC_URL", value_parser = public_url)]
    pub public_url: Option<url::Url>,
    /// How long a portal link is valid when the request names no `ttl_seconds`.
    #[arg(long, env = "HEADROOM_PORTAL_LINK_TTL", default_value = "12h", value_parser = crate::flags::duration)]
    pub portal_link_ttl: Duration,
    /// The longest `ttl_seconds` a portal or console link may ask for.
    #[arg(long, env = "HEADROOM_PORTAL_LINK_MAX_TTL", default_value = "30days", value_parser = crate::flags::duration)]
    pub portal_link_max_ttl: Duration,
    /// How long a console sign-in lasts.
    #[arg(long, env = "HEADROOM_CONSOLE_SESSION_TTL", default_value = "12h", value_parser = crate::flags::duration)]
    pub console_session_ttl: Duration,
    /// Console sign-ins and link openings allowed per minute per client
    /// address (in bursts of as many); past it `429`.
    #[arg(long, env = "HEADROOM_LOGIN_RATE", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub login_rate: u32,
}

impl Default for PageSettings {
    fn default() -> Self {
        crate::flags::defaults()
    }
}

/// Signing keys, never printed.
#[derive(Clone)]
pub struct Secrets(pub Arc<[String]>);

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} × ***)", self.0.len())
    }
}

fn secrets(s: &str) -> Result<Secrets, String> {
    let keys = crate::flags::list(s);
    if keys.is_empty() {
        return Err("name at least one key; generate one with `openssl rand -hex 32`".into());
    }
    if keys.iter().any(|k| k.chars().count() < 16) {
        return Err(
            "every key must be at least 16 characters; generate one with `openssl rand -hex 32`"
                .into(),
        );
    }
    Ok(Secrets(keys.into()))
}

fn public_url(s: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(s)
        .map_err(|e| format!("not a URL ({e}); write e.g. https://licences.example.com"))?;
    if !matches!(u.scheme(), "http" | "https") || u.host().is_none() {
        return Err(
            "write an http:// or https:// address, e.g. https://licences.example.com".into(),
        );
    }
    if u.query().is_some() || u.fragment().is_some() {
        return Err("write the address without a query or fragment".into());
    }
    Ok(u)
}

/// What the pages need at run time.
#[derive(Clone)]
pub struct Pages {
    pub settings: PageSettings,
    pub signer: Signer,
    /// Sign-ins and link openings per client address.
    logins: Arc<DefaultKeyedRateLimiter<IpAddr>>,
}

impl std::fmt::Debug for Pages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pages")
            .field("signer", &self.signer)
            .finish()
    }
}

impl Pages {
    /// The signing keys: configured, derived from the cluster secret, or
    /// generated (logged: links then end with the process).
    pub fn new(settings: PageSettings, cluster_secret: Option<&str>) -> Self {
        let keys = match (&settings.portal_secrets, cluster_secret) {
            (Some(s), _) => s.0.iter().map(|k| k.as_bytes().to_vec()).collect(),
            (None, Some(secret)) => vec![derived_key(secret)],
            (None, None) => {
                tracing::info!(
                    "no --portal-secrets: portal and console links are signed with a key generated \
                     now, and stop working when this process stops"
                );
                let mut key = vec![0u8; 32];
                rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
                vec![key]
            }
        };
        let per_minute = NonZeroU32::new(settings.login_rate).unwrap_or(NonZeroU32::MIN);
        Pages {
            signer: Signer::new(keys),
            logins: Arc::new(DefaultKeyedRateLimiter::keyed(Quota::per_minute(
                per_minute,
            ))),
            settings,
        }
    }

    /// Takes one sign-in or link opening from the caller's allowance.
    fn login_allowed(&self, req: &HttpRequest) -> Result<(), PageError> {
        let ip = client(req)
            .1
            .and_then(|a| a.parse().ok())
            .unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if self.logins.len() > 100_000 {
            self.logins.retain_recent();
        }
        self.logins.check_key(&ip).map_err(|_| {
            metrics::counter!("headroom_page_logins_total", "outcome" => "rate_limited")
                .increment(1);
            PageError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "Too many attempts",
                "Too many sign-ins or link openings from this address; wait a minute and try again.",
            )
        })
    }

    /// `path` as people should open it: absolute under `--public-url`.
    pub fn url(&self, path: &str) -> String {
        match &self.settings.public_url {
            Some(base) => format!("{}{path}", base.as_str().trim_end_matches('/')),
            None => path.to_string(),
        }
    }

    /// Cookies are `Secure` when people reach headroom over https.
    fn secure_cookies(&self) -> bool {
        self.settings
            .public_url
            .as_ref()
            .is_some_and(|u| u.scheme() == "https")
    }
}

/// The signing key of several nodes that share a cluster secret but were
/// given no portal secrets: the same on every node, and not the secret.
fn derived_key(cluster_secret: &str) -> Vec<u8> {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(cluster_secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(b"headroom portal links");
    mac.finalize().into_bytes().to_vec()
}

/// The headers of every page and asset: a strict content security policy
/// (scripts and styles only from this origin, nothing inline), no framing,
/// no referrer (a link's token never leaves in one), no sniffing.
fn security_headers() -> DefaultHeaders {
    DefaultHeaders::new()
        .add((
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
             connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ))
        .add((header::REFERRER_POLICY, "no-referrer"))
        .add((header::X_CONTENT_TYPE_OPTIONS, "nosniff"))
        .add((header::X_FRAME_OPTIONS, "DENY"))
        .add(("Cross-Origin-Opener-Policy", "same-origin"))
}

/// A page route: timed like the API's, with the pages' headers.
fn page(
    pattern: &'static str,
    methods: &'static [&'static str],
) -> actix_web::Resource<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    super::timed(pattern, methods)
        .app_data(
            web::FormConfig::default()
                .limit(16 * 1024)
                .error_handler(|e, _| PageError::bad_request(format!("the form: {e}")).into()),
        )
        .wrap(security_headers())
}

/// Declares the page routes once: [`ROUTES`] (their patterns, for the
/// metrics catalogue, checked by a test) and [`routes`] come from the same
/// lines. The catch-alls go last.
macro_rules! pages {
    ($($pattern:literal => { $($method:ident => $handler:path),+ $(,)? }),+ $(,)?) => {
        /// Every page route's pattern.
        pub const ROUTES: &[&str] = &[$($pattern),+];

        /// Every page route, each timed and with the pages' headers.
        pub fn routes(cfg: &mut ServiceConfig) {
            $({
                let resource = page($pattern, &[$(pages!(@name $method)),+]);
                $(let resource = route_of!(resource, $method, $handler);)+
                cfg.service(resource);
            })+
        }
    };
    (@name get) => { "GET" };
    (@name post) => { "POST" };
}

pages! {
    "/portal/e/{id}" => { get => portal::show },
    "/portal/e/{id}/customer-cap" => { post => portal::set_customer_cap },
    "/console/login" => { get => console::login_form, post => console::login },
    "/console/logout" => { post => console::logout },
    "/console" => { get => console::overdraft },
    "/console/denied" => { get => console::denied },
    "/console/search" => { get => console::search },
    "/console/overdraft.csv" => { get => console::overdraft_csv },
    "/console/e/{id}" => { get => console::entitlement },
    "/console/e/{id}/history.csv" => { get => console::history_csv },
    "/console/e/{id}/portal-links" => { post => console::mint_link },
    "/console/e/{id}/revoke-links" => { post => console::revoke_links },
    "/assets/{hash}/{name}" => { get => assets::serve },
    "/docs" => { get => docs::redirect },
    "/docs/{file:.*}" => { get => docs::serve },
    "/portal/{tail:.*}" => { get => page_not_found },
    "/console/{tail:.*}" => { get => page_not_found },
}

async fn page_not_found() -> Result<HttpResponse, PageError> {
    Err(PageError::not_found())
}

/// An error shown as a page.
#[derive(Debug)]
pub struct PageError {
    status: StatusCode,
    title: String,
    detail: String,
    retry_after: Option<u64>,
}

#[derive(Template)]
#[template(path = "error.html")]
struct ErrorPage<'a> {
    assets: &'static assets::Urls,
    title: &'a str,
    detail: &'a str,
}

impl PageError {
    pub fn new(status: StatusCode, title: impl Into<String>, detail: impl Into<String>) -> Self {
        PageError {
            status,
            title: title.into(),
            detail: detail.into(),
            retry_after: None,
        }
    }

    pub fn not_found() -> Self {
        PageError::new(
            StatusCode::NOT_FOUND,
            "Not found",
            "There is no such page. Check the address, or ask for a new link.",
        )
    }

    pub fn bad_request(detail: impl Into<String>) -> Self {
        PageError::new(StatusCode::BAD_REQUEST, "Not accepted", detail)
    }

    /// A defect: logged with its cause, shown without it.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "a page failed");
        PageError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "Internal error",
            "Something went wrong on our side; it has been logged.",
        )
    }
}

impl std::fmt::Display for PageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.status.as_u16(), self.detail)
    }
}

/// An API error on a page: its status and detail, shown (an unknown
/// entitlement is a page that does not exist).
impl From<ApiError> for PageError {
    fn from(e: ApiError) -> Self {
        let (status, _, title) = e.kind.describe();
        if status == StatusCode::NOT_FOUND {
            return PageError::not_found();
        }
        PageError {
            status,
            title: title.to_string(),
            detail: e.detail,
            retry_after: e.retry_after,
        }
    }
}

impl From<crate::engine::EngineError> for PageError {
    fn from(e: crate::engine::EngineError) -> Self {
        ApiError::from(e).into()
    }
}

impl From<crate::store::StoreError> for PageError {
    fn from(e: crate::store::StoreError) -> Self {
        crate::engine::EngineError::from(e).into()
    }
}

impl ResponseError for PageError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse {
        let page = ErrorPage {
            assets: assets::urls(),
            title: &self.title,
            detail: &self.detail,
        };
        let mut res = html(self.status, &page);
        if let Some(s) = self.retry_after {
            res.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        res
    }
}

/// A rendered page, never cached.
fn html(status: StatusCode, page: &impl Template) -> HttpResponse {
    match page.render() {
        Ok(body) => HttpResponse::build(status)
            .insert_header((header::CONTENT_TYPE, "text/html; charset=utf-8"))
            .insert_header((header::CACHE_CONTROL, "no-store"))
            .body(body),
        Err(e) => {
            tracing::error!(error = %e, "a page could not be rendered");
            HttpResponse::InternalServerError()
                .insert_header((header::CACHE_CONTROL, "no-store"))
                .body("the page could not be rendered")
        }
    }
}

/// The entitlement of a page's path; a malformed id is a page that does
/// not exist.
fn entitlement_id(raw: &str) -> Result<crate::domain::EntitlementId, PageError> {
    crate::domain::EntitlementId::parse(raw).map_err(|_| PageError::not_found())
}

/// A page's query parameters as `T`.
fn query<T: serde::de::DeserializeOwned>(req: &HttpRequest) -> Result<T, PageError> {
    serde_urlencoded::from_str(req.query_string())
        .map_err(|e| PageError::bad_request(format!("the query is not understood ({e})")))
}

/// A redirect after a form or a link (`303 See Other`: the browser GETs it).
fn see_other(location: &str) -> HttpResponse {
    HttpResponse::SeeOther()
        .insert_header((header::LOCATION, location))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .finish()
}

/// A session cookie: HttpOnly, `SameSite=Lax` (sent when the customer
/// follows the link from their mail, not on another site's requests),
/// limited to `path`, expiring with the session.
fn session_cookie<'a>(
    pages: &Pages,
    name: &'a str,
    value: String,
    path: String,
    max_age: chrono::Duration,
) -> actix_web::cookie::Cookie<'a> {
    actix_web::cookie::Cookie::build(name, value)
        .path(path)
        .http_only(true)
        .secure(pages.secure_cookies())
        .same_site(actix_web::cookie::SameSite::Lax)
        .max_age(actix_web::cookie::time::Duration::seconds(
            max_age.num_seconds().max(0),
        ))
        .finish()
}

/// The `Host` the browser sent and its address, also when another node
/// received the request and sent it on to the entitlement's owner.
fn client(req: &HttpRequest) -> (Option<String>, Option<String>) {
    let from_a_node = req
        .app_data::<web::Data<crate::http::AppState>>()
        .and_then(|s| s.forwarder.as_ref())
        .is_some_and(|f| f.is_from_a_node(req.headers()));
    crate::nodes::forward::client_of(req, from_a_node)
}

/// Whether a form was posted from one of these pages: the `Origin` header,
/// when the browser sends one, must be the host the browser asked, or the
/// public URL's (the CSRF token is checked as well).
fn same_origin(req: &HttpRequest) -> bool {
    let Some(origin) = req.headers().get(header::ORIGIN) else {
        return true;
    };
    let Some(origin) = origin.to_str().ok().and_then(|o| url::Url::parse(o).ok()) else {
        return false;
    };
    let public = req
        .app_data::<web::Data<crate::http::AppState>>()
        .and_then(|s| s.pages.settings.public_url.clone());
    if public.is_some_and(|p| p.origin() == origin.origin()) {
        return true;
    }
    let port = origin.port().map(|p| format!(":{p}")).unwrap_or_default();
    let host = client(req).0.unwrap_or_default();
    origin
        .host_str()
        .is_some_and(|h| format!("{h}{port}").eq_ignore_ascii_case(&host))
}
