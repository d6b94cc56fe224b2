//! HTTP handlers. Each extracts, validates, calls and shapes the response; the work lives in
//! `resolve`, the cache and the backend.

pub mod admin;
pub mod encode;
pub mod experiments;
pub mod generate;
pub mod health;
pub mod models;

use axum::http::{HeaderMap, HeaderName, HeaderValue};

use super::resolve::Target;

pub const MERGE_HEADER: &str = "x-knots-merge";
pub const ARM_HEADER: &str = "x-knots-arm";
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The headers that say what served a request.
pub fn headers(target: &Target, request_id: &str) -> HeaderMap {
    let mut h = HeaderMap::new();
    let mut put = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            h.insert(HeaderName::from_static(name), v);
        }
    };
    put(MERGE_HEADER, target.merge_header());
    put(REQUEST_ID_HEADER, request_id.to_string());
    if let Some((exp, arm)) = &target.arm {
        put(ARM_HEADER, format!("{exp}/{arm}"));
    }
    h
}
