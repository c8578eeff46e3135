//! The vendor's console, `/console`: who is in overdraft (paged, sorted),
//! who was denied recently, each entitlement's page with its configuration
//! and a button that mints a portal link, and CSV exports. Signed in with
//! an admin token (a form, or a console link minted through the API), kept
//! in an HttpOnly session cookie.

use std::collections::{BinaryHeap, HashMap};

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, web};
use askama::Template;
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::data::{EntitlementData, Range, utc};
use super::portal::PageQuery;
use super::sign::{Claims, LinkScope, Purpose};
use super::{PageError, assets, entitlement_id, html, same_origin, see_other, session_cookie};
use crate::domain::{BucketSize, EntitlementId};
use crate::http::AppState;
use crate::http::reports::ReportItem;

pub const COOKIE: &str = "headroom_console";
/// Rows of one page of the console's lists.
pub const PAGE_SIZE: usize = 50;
/// Entitlements read from the store at a time while sorting the report.
const READ_PAGE: usize = 1000;

/// Why a console request was not served: not signed in (go to the form),
/// or an error to show.
pub enum Refused {
    SignIn,
    Page(PageError),
}

impl From<PageError> for Refused {
    fn from(e: PageError) -> Self {
        Refused::Page(e)
    }
}

impl From<crate::http::problem::ApiError> for Refused {
    fn from(e: crate::http::problem::ApiError) -> Self {
        Refused::Page(e.into())
    }
}

impl From<crate::engine::EngineError> for Refused {
    fn from(e: crate::engine::EngineError) -> Self {
        Refused::Page(e.into())
    }
}

impl From<Refused> for actix_web::Error {
    fn from(r: Refused) -> Self {
        match r {
            Refused::Page(e) => e.into(),
            Refused::SignIn => actix_web::error::InternalError::from_response(
                "sign in",
                see_other("/console/login"),
            )
            .into(),
        }
    }
}

impl std::fmt::Debug for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refused::SignIn => f.write_str("SignIn"),
            Refused::Page(e) => write!(f, "{e:?}"),
        }
    }
}

type Result<T> = std::result::Result<T, Refused>;

/// The signed-in session: its claims and the cookie's value (for CSRF).
pub struct Session {
    cookie: String,
}

impl Session {
    fn csrf(&self, state: &AppState) -> String {
        state.pages.signer.csrf(&self.cookie)
    }
}

/// Checks a console token: signed, of `purpose`, not expired, and made
/// with an admin token that is still configured.
fn check(state: &AppState, token: &str, purpose: Purpose) -> Option<Claims> {
    let claims = state.pages.signer.verify(token).ok()?;
    let now = state.engine.now().timestamp_millis();
    let admin_known = claims
        .admin
        .as_deref()
        .is_some_and(|fp| state.auth.knows_admin_fingerprint(fp));
    (claims.purpose == purpose && claims.expires_at > now && admin_known).then_some(claims)
}

fn session(req: &HttpRequest, state: &AppState) -> Result<Session> {
    let cookie = req.cookie(COOKIE).ok_or(Refused::SignIn)?;
    check(state, cookie.value(), Purpose::ConsoleSession).ok_or(Refused::SignIn)?;
    Ok(Session {
        cookie: cookie.value().to_string(),
    })
}

/// A form posted in a session: its CSRF token must be the session's, and
/// its origin this site.
fn posted(req: &HttpRequest, state: &AppState, form: &HashMap<String, String>) -> Result<Session> {
    let s = session(req, state)?;
    let ok = form
        .get("csrf")
        .is_some_and(|t| state.pages.signer.check_csrf(&s.cookie, t));
    if !ok || !same_origin(req) {
        return Err(PageError::new(
            StatusCode::FORBIDDEN,
            "Not accepted",
            "This form has expired or did not come from this console; reload the page and try again.",
        )
        .into());
    }
    Ok(s)
}

/// Where to go after signing in with a link: `next` when it is a console
/// page (nothing else: a link cannot send the browser elsewhere).
fn next_page(next: Option<&str>) -> &str {
    match next {
        Some(n)
            if (n == "/console" || n.starts_with("/console/") || n.starts_with("/console?"))
                && !n.contains("//")
                && !n.contains('\\')
                && n.chars().all(|c| c.is_ascii_graphic()) =>
        {
            n
        }
        _ => "/console",
    }
}

fn signed_in(state: &AppState, admin: String, next: &str) -> HttpResponse {
    let now = state.engine.now();
    let ttl = chrono::Duration::from_std(state.pages.settings.console_session_ttl)
        .unwrap_or(chrono::Duration::hours(12));
    let claims = Claims {
        purpose: Purpose::ConsoleSession,
        entitlement: None,
        incarnation: None,
        scope: None,
        admin: Some(admin),
        issued_at: now.timestamp_millis(),
        expires_at: (now + ttl).timestamp_millis(),
        nonce: super::sign::nonce(),
    };
    let cookie = session_cookie(
        &state.pages,
        COOKIE,
        state.pages.signer.sign(&claims),
        "/console".into(),
        ttl,
    );
    let mut res = see_other(next);
    // A cookie built from a signed token and fixed attributes always encodes.
    let _ = res.add_cookie(&cookie);
    res
}

#[derive(Template)]
#[template(path = "console_login.html")]
struct LoginPage<'a> {
    assets: &'static assets::Urls,
    error: Option<&'a str>,
}

fn login_page(status: StatusCode, error: Option<&str>) -> HttpResponse {
    html(
        status,
        &LoginPage {
            assets: assets::urls(),
            error,
        },
    )
}

/// `GET /console/login`: the form; with `?token=` (a console link) signs
/// in, and goes on to `next` (a console page) when given.
pub async fn login_form(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse> {
    let query = PageQuery::of(&req)?;
    let Some(token) = query.token else {
        return Ok(login_page(StatusCode::OK, None));
    };
    state.pages.login_allowed(&req)?;
    match check(&state, &token, Purpose::ConsoleLink) {
        Some(claims) => {
            metrics::counter!("headroom_page_logins_total", "outcome" => "opened").increment(1);
            Ok(signed_in(
                &state,
                claims.admin.unwrap_or_default(),
                next_page(query.next.as_deref()),
            ))
        }
        None => {
            metrics::counter!("headroom_page_logins_total", "outcome" => "refused").increment(1);
            Ok(login_page(
                StatusCode::UNAUTHORIZED,
                Some("This console link is not valid or has expired; sign in with an admin token."),
            ))
        }
    }
}

#[derive(Deserialize)]
pub struct LoginForm {
    token: String,
}

/// `POST /console/login`: an admin token signs in (rate-limited per address).
pub async fn login(
    req: HttpRequest,
    form: web::Form<LoginForm>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    state.pages.login_allowed(&req)?;
    match state.auth.admin_fingerprint(form.token.trim()) {
        Some(fp) => {
            metrics::counter!("headroom_page_logins_total", "outcome" => "signed_in").increment(1);
            Ok(signed_in(&state, fp, "/console"))
        }
        None => {
            metrics::counter!("headroom_page_logins_total", "outcome" => "refused").increment(1);
            Ok(login_page(
                StatusCode::UNAUTHORIZED,
                Some("That is not an admin token of this tracker."),
            ))
        }
    }
}

/// `POST /console/logout`: ends the session on this browser.
pub async fn logout(
    req: HttpRequest,
    form: web::Form<HashMap<String, String>>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    posted(&req, &state, &form)?;
    let mut res = see_other("/console/login");
    let mut gone = actix_web::cookie::Cookie::build(COOKIE, "")
        .path("/console")
        .http_only(true)
        .finish();
    gone.make_removal();
    let _ = res.add_cookie(&gone);
    Ok(res)
}

/// How the overdraft list is ordered.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Sort {
    /// Longest in overdraft first.
    Since,
    /// Highest seat peak first.
    Peak,
    /// Most denials (since overdraft, this period) first.
    Denials,
    /// By entitlement id.
    Id,
}

impl Sort {
    const ALL: [Sort; 4] = [Sort::Since, Sort::Peak, Sort::Denials, Sort::Id];

    fn key(self) -> &'static str {
        match self {
            Sort::Since => "since",
            Sort::Peak => "peak",
            Sort::Denials => "denials",
            Sort::Id => "id",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Sort::Since => "In overdraft since",
            Sort::Peak => "Seat peak",
            Sort::Denials => "Denials",
            Sort::Id => "Entitlement",
        }
    }
}

/// One row of the overdraft list.
pub struct Row {
    id: String,
    since: Option<DateTime<Utc>>,
    since_label: String,
    seats: String,
    seat_peak: u64,
    denials: u64,
    features: String,
}

impl Row {
    fn of(item: &ReportItem) -> Row {
        let s = &item.seats;
        Row {
            id: item.entitlement.to_string(),
            since: item.overdraft_since,
            since_label: item.overdraft_since.map(utc).unwrap_or_default(),
            seats: format!("{} / {} / {}", s.in_use, s.purchased, s.hard_cap),
            seat_peak: s.peak,
            denials: s.denied_period + item.features.values().map(|f| f.denied_period).sum::<u64>(),
            features: item
                .features
                .iter()
                .map(|(k, f)| format!("{k}: {} / {} / {}", f.used, f.included, f.hard_cap))
                .collect::<Vec<_>>()
                .join(", "),
        }
    }

    /// The order key: smaller comes first; ties by id.
    fn order(&self, sort: Sort) -> (i64, String) {
        let n = match sort {
            Sort::Since => self.since.map_or(i64::MAX, |t| t.timestamp_millis()),
            Sort::Peak => -(self.seat_peak.min(i64::MAX as u64) as i64),
            Sort::Denials => -(self.denials.min(i64::MAX as u64) as i64),
            Sort::Id => 0,
        };
        (n, self.id.clone())
    }
}

/// The first `keep` rows in `sort` order, out of every entitlement in
/// overdraft: read a page at a time, keeping only a heap of `keep` rows
/// (memory bounded by the page shown, not by how many are in overdraft).
async fn sorted_rows(
    state: &AppState,
    sort: Sort,
    keep: usize,
) -> Result<(Vec<Row>, usize, usize)> {
    let mut heap: BinaryHeap<((i64, String), usize)> = BinaryHeap::new();
    let mut rows: HashMap<usize, Row> = HashMap::new();
    let mut after: Option<String> = None;
    let (mut total, mut unreadable, mut n) = (0usize, 0usize, 0usize);
    loop {
        let page = state
            .engine
            .overdraft_page(after.as_deref(), READ_PAGE)
            .await?;
        unreadable += page.unreadable.len();
        for v in page.views {
            let item = ReportItem::of(v, None);
            if !item.in_overdraft() {
                continue;
            }
            total += 1;
            let row = Row::of(&item);
            let key = row.order(sort);
            if heap.len() < keep {
                heap.push((key, n));
                rows.insert(n, row);
            } else if heap.peek().is_some_and(|(top, _)| key < *top) {
                if let Some((_, gone)) = heap.pop() {
                    rows.remove(&gone);
                }
                heap.push((key, n));
                rows.insert(n, row);
            }
            n += 1;
        }
        match page.next_after {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    let mut ordered: Vec<((i64, String), usize)> = heap.into_vec();
    ordered.sort();
    let out = ordered
        .into_iter()
        .filter_map(|(_, i)| rows.remove(&i))
        .collect();
    Ok((out, total, unreadable))
}

struct SortLink {
    key: &'static str,
    label: &'static str,
    selected: bool,
}

#[derive(Template)]
#[template(path = "console_overdraft.html")]
struct OverdraftPage {
    assets: &'static assets::Urls,
    csrf: String,
    rows: Vec<Row>,
    total: usize,
    unreadable: usize,
    sorts: Vec<SortLink>,
    sort: &'static str,
    page: usize,
    pages: usize,
    first: usize,
}

#[derive(Deserialize)]
pub struct OverdraftQuery {
    sort: Option<String>,
    page: Option<String>,
}

/// `GET /console?sort=since|peak|denials|id&page=N`: who is in overdraft.
pub async fn overdraft(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse> {
    let s = session(&req, &state)?;
    let q: OverdraftQuery = super::query(&req)?;
    let sort = match q.sort.as_deref() {
        None | Some("") => Sort::Since,
        Some(k) => Sort::ALL
            .into_iter()
            .find(|s| s.key() == k)
            .ok_or_else(|| {
                PageError::bad_request(format!(
                    "unknown sort {k:?}; use since, peak, denials or id"
                ))
            })?,
    };
    let page: usize = match q.page.as_deref() {
        None | Some("") => 1,
        Some(p) => p
            .parse()
            .ok()
            .filter(|p| (1..=10_000).contains(p))
            .ok_or_else(|| PageError::bad_request("page must be a number from 1 to 10000"))?,
    };
    let (mut rows, total, unreadable) = sorted_rows(&state, sort, page * PAGE_SIZE).await?;
    let first = (page - 1) * PAGE_SIZE;
    let rows: Vec<Row> = if rows.len() > first {
        rows.split_off(first)
    } else {
        Vec::new()
    };
    Ok(html(
        StatusCode::OK,
        &OverdraftPage {
            assets: assets::urls(),
            csrf: s.csrf(&state),
            rows,
            total,
            unreadable,
            sorts: Sort::ALL
                .into_iter()
                .map(|x| SortLink {
                    key: x.key(),
                    label: x.label(),
                    selected: x == sort,
                })
                .collect(),
            sort: sort.key(),
            page,
            pages: total.div_ceil(PAGE_SIZE).max(1),
            first: first + 1,
        },
    ))
}

struct DeniedRow {
    id: String,
    at: String,
    seats_denied: u64,
    seats: String,
    features: String,
}

#[derive(Template)]
#[template(path = "console_denied.html")]
struct DeniedPage {
    assets: &'static assets::Urls,
    csrf: String,
    hours: i64,
    rows: Vec<DeniedRow>,
    unreadable: usize,
    next: Option<String>,
}

#[derive(Deserialize)]
pub struct DeniedQuery {
    hours: Option<String>,
    after: Option<String>,
}

/// `GET /console/denied?hours=N`: entitlements with a denial in the last
/// hours, most recent first; `after` continues a list.
pub async fn denied(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse> {
    let s = session(&req, &state)?;
    let q: DeniedQuery = super::query(&req)?;
    let max = crate::http::reports::MAX_DENIED_HOURS;
    let hours: i64 = match q.hours.as_deref() {
        None | Some("") => 24,
        Some(h) => h
            .parse()
            .ok()
            .filter(|h| (1..=max).contains(h))
            .ok_or_else(|| PageError::bad_request(format!("hours must be from 1 to {max}")))?,
    };
    let after = match q.after.as_deref() {
        None | Some("") => None,
        Some(a) => {
            let (at, id) = a
                .split_once('.')
                .and_then(|(at, id)| {
                    Some((at.parse::<i64>().ok()?, EntitlementId::parse(id).ok()?))
                })
                .ok_or_else(|| PageError::bad_request("the list position is malformed"))?;
            Some((at, id.to_string()))
        }
    };
    let page = state.engine.denied_page(hours, after, PAGE_SIZE).await?;
    let rows = page
        .entries
        .into_iter()
        .map(|(v, at)| {
            let item = ReportItem::of(v, Some(at));
            let r = Row::of(&item);
            DeniedRow {
                id: r.id,
                at: utc(at),
                seats_denied: item.seats.denied_total,
                seats: r.seats,
                features: item
                    .features
                    .iter()
                    .map(|(k, f)| format!("{k}: {} denied this period", f.denied_period))
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        })
        .collect();
    Ok(html(
        StatusCode::OK,
        &DeniedPage {
            assets: assets::urls(),
            csrf: s.csrf(&state),
            hours,
            rows,
            unreadable: page.unreadable.len(),
            next: page.next_after.map(|(at, id)| format!("{at}.{id}")),
        },
    ))
}

#[derive(Deserialize)]
pub struct SearchQuery {
    id: Option<String>,
}

/// `GET /console/search?id=…`: to that entitlement's page (which says
/// when there is none; it is served by the entitlement's owner).
pub async fn search(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse> {
    session(&req, &state)?;
    let q: SearchQuery = super::query(&req)?;
    let raw = q.id.unwrap_or_default();
    let raw = raw.trim();
    let id = EntitlementId::parse(raw).map_err(|e| {
        PageError::bad_request(format!("{raw:?} is not an entitlement id: {}", e.message))
    })?;
    Ok(see_other(&format!("/console/e/{id}")))
}

/// A link minted on the entitlement's page, shown once.
pub struct Minted {
    url: String,
    scope: &'static str,
    expires: String,
}

#[derive(Template)]
#[template(path = "console_entitlement.html")]
struct EntitlementPage<'a> {
    assets: &'static assets::Urls,
    csrf: String,
    e: &'a EntitlementData,
    base: String,
    config: String,
    minted: Option<Minted>,
    notice: Option<&'a str>,
}

async fn entitlement_page(
    state: &AppState,
    s: &Session,
    id: &EntitlementId,
    range: Range,
    minted: Option<Minted>,
    notice: Option<&str>,
) -> Result<HttpResponse> {
    let data = EntitlementData::load(&state.engine, id, range).await?;
    let config = serde_json::to_string_pretty(&data.view.config).unwrap_or_default();
    Ok(html(
        StatusCode::OK,
        &EntitlementPage {
            assets: assets::urls(),
            csrf: s.csrf(state),
            base: format!("/console/e/{id}"),
            e: &data,
            config,
            minted,
            notice,
        },
    ))
}

/// `GET /console/e/{id}?range=…`: the customer's page, the configuration,
/// and the forms that mint and withdraw portal links.
pub async fn entitlement(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let s = session(&req, &state)?;
    let id = entitlement_id(&path)?;
    let query = PageQuery::of(&req)?;
    let range = Range::parse(query.range.as_deref())?;
    entitlement_page(&state, &s, &id, range, None, None).await
}

/// `POST /console/e/{id}/portal-links` (`scope`, `hours`): mints a link
/// and shows it once.
pub async fn mint_link(
    req: HttpRequest,
    path: web::Path<String>,
    form: web::Form<HashMap<String, String>>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let s = posted(&req, &state, &form)?;
    let id = entitlement_id(&path)?;
    let scope = match form.get("scope").map(String::as_str) {
        None | Some("view") => LinkScope::View,
        Some("manage") => LinkScope::Manage,
        Some(other) => {
            return Err(PageError::bad_request(format!(
                "unknown scope {other:?}; choose view or manage"
            ))
            .into());
        }
    };
    let ttl = match form
        .get("hours")
        .map(|h| h.trim())
        .filter(|h| !h.is_empty())
    {
        None => None,
        Some(h) => Some(
            h.parse::<u64>()
                .ok()
                .and_then(|h| h.checked_mul(3600))
                .ok_or_else(|| PageError::bad_request("hours must be a whole number"))?,
        ),
    };
    let link = super::links::mint_portal(&state, &id, scope, ttl).await?;
    let minted = Minted {
        url: link.url,
        scope: scope.as_str(),
        expires: utc(link.expires_at),
    };
    entitlement_page(&state, &s, &id, Range::Week, Some(minted), None).await
}

/// `POST /console/e/{id}/revoke-links`: withdraws every portal link and
/// customer session of the entitlement issued until now.
pub async fn revoke_links(
    req: HttpRequest,
    path: web::Path<String>,
    form: web::Form<HashMap<String, String>>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    let s = posted(&req, &state, &form)?;
    let id = entitlement_id(&path)?;
    super::links::revoke(&state, &id).await?;
    entitlement_page(
        &state,
        &s,
        &id,
        Range::Week,
        None,
        Some("Every portal link of this entitlement issued until now was withdrawn."),
    )
    .await
}

/// `GET /console/overdraft.csv`: the whole overdraft report.
pub async fn overdraft_csv(req: HttpRequest, state: web::Data<AppState>) -> Result<HttpResponse> {
    session(&req, &state)?;
    Ok(super::csv::overdraft(state).await?)
}

#[derive(Deserialize)]
pub struct HistoryCsvQuery {
    bucket: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

fn instant(field: &str, raw: &str) -> std::result::Result<DateTime<Utc>, PageError> {
    crate::http::reports::instant(field, raw).map_err(|e| PageError::bad_request(e.detail))
}

/// `GET /console/e/{id}/history.csv?bucket=hour|day&from=&to=`: the
/// entitlement's history; by default hourly over the last 30 days.
pub async fn history_csv(
    req: HttpRequest,
    path: web::Path<String>,
    state: web::Data<AppState>,
) -> Result<HttpResponse> {
    session(&req, &state)?;
    let id = entitlement_id(&path)?;
    let q: HistoryCsvQuery = super::query(&req)?;
    let size = match q.bucket.as_deref() {
        None | Some("") => BucketSize::Hour,
        Some(b) => BucketSize::parse(b).ok_or_else(|| {
            PageError::bad_request(format!("unknown bucket {b:?}; use hour or day"))
        })?,
    };
    let to = match q.to.as_deref() {
        None | Some("") => state.engine.now(),
        Some(t) => instant("to", t)?,
    };
    let from = match q.from.as_deref() {
        None | Some("") => to - chrono::Duration::days(30),
        Some(f) => instant("from", f)?,
    };
    if from > to {
        return Err(PageError::bad_request("from must not be after to").into());
    }
    Ok(super::csv::history(state, id, size, from, to).await?)
}

#[cfg(test)]
mod tests {
    use super::next_page;

    #[test]
    fn a_console_link_goes_on_only_to_console_pages() {
        for ok in [
            "/console",
            "/console/e/acme",
            "/console?sort=peak",
            "/console/denied",
        ] {
            assert_eq!(next_page(Some(ok)), ok);
        }
        for bad in [
            "https://evil.example/",
            "//evil.example",
            "/console//evil",
            "/consolex",
            "/console/\\evil",
            "/console/e/a b",
            "/portal/e/acme",
        ] {
            assert_eq!(next_page(Some(bad)), "/console", "{bad}");
        }
        assert_eq!(next_page(None), "/console");
    }
}
