//! Prints the OpenAPI document: `cargo run --example openapi_json > openapi.json`.

fn main() {
    let doc = headroom::http::openapi::document_json().expect("the document encodes");
    println!("{doc}");
}
