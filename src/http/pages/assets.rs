//! The pages' scripts and styles, embedded in the binary (the pages work
//! air-gapped) and served under names that hold a hash of their content,
//! so browsers may keep them for a year: a new build changes the name.

use std::sync::LazyLock;

use actix_web::http::header;
use actix_web::{HttpResponse, web};

use super::PageError;

struct Asset {
    name: &'static str,
    content_type: &'static str,
    bytes: &'static [u8],
}

const JS: &str = "text/javascript; charset=utf-8";
const CSS: &str = "text/css; charset=utf-8";

/// uPlot 1.6.32 (MIT, see `assets/uplot/LICENSE`), vendored unchanged from
/// its npm package's `dist/`; the pages' own script and style.
static FILES: [Asset; 4] = [
    Asset {
        name: "uPlot.iife.min.js",
        content_type: JS,
        bytes: include_bytes!("assets/uplot/uPlot.iife.min.js"),
    },
    Asset {
        name: "uPlot.min.css",
        content_type: CSS,
        bytes: include_bytes!("assets/uplot/uPlot.min.css"),
    },
    Asset {
        name: "charts.js",
        content_type: JS,
        bytes: include_bytes!("assets/charts.js"),
    },
    Asset {
        name: "pages.css",
        content_type: CSS,
        bytes: include_bytes!("assets/pages.css"),
    },
];

/// Where each asset is served, for the templates.
pub struct Urls {
    pub uplot_js: String,
    pub uplot_css: String,
    pub charts_js: String,
    pub pages_css: String,
}

fn hash(bytes: &[u8]) -> String {
    format!("{:016x}", xxhash_rust::xxh3::xxh3_64(bytes))
}

static URLS: LazyLock<(Urls, Vec<String>)> = LazyLock::new(|| {
    let hashes: Vec<String> = FILES.iter().map(|f| hash(f.bytes)).collect();
    let url = |i: usize| format!("/assets/{}/{}", hashes[i], FILES[i].name);
    let urls = Urls {
        uplot_js: url(0),
        uplot_css: url(1),
        charts_js: url(2),
        pages_css: url(3),
    };
    (urls, hashes)
});

pub fn urls() -> &'static Urls {
    &URLS.0
}

/// `GET /assets/{hash}/{name}`: the asset, if the hash is its content's.
pub async fn serve(path: web::Path<(String, String)>) -> Result<HttpResponse, PageError> {
    let (hash, name) = path.into_inner();
    let hashes = &URLS.1;
    let found = FILES
        .iter()
        .zip(hashes)
        .find(|(f, h)| f.name == name && **h == hash);
    let Some((asset, _)) = found else {
        return Err(PageError::not_found());
    };
    Ok(HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, asset.content_type))
        .insert_header((header::CACHE_CONTROL, "public, max-age=31536000, immutable"))
        .body(asset.bytes))
}
