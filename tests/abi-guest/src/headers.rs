//! Header maps: `proxy_get_header_map_pairs`, `proxy_get_header_map_value`,
//! `proxy_add/replace/remove_header_map_value`, `proxy_set_header_map_pairs`, on request headers
//! (seen by the upstream) and response headers (seen by the client).
//!
//! * `/echo` — answers locally: the body is the request's pairs as JSON `[[name, value], …]` in
//!   the host's order; `x-get-value` is the value of `x-probe`, `x-get-method` the value of
//!   `:method`, `x-get-missing` is `none` when `x-absent` is absent.
//! * `/edit-echo` — makes the request edits of the default variant (below), then answers locally
//!   with the request's pairs as JSON, in the host's order after the edits.
//! * `/set-pairs…` — replaces the request's map with its pseudo-headers (and, for a path with
//!   `keep-proto` in it, `x-forwarded-proto`, without which Envoy finds no route) plus
//!   `x-set-pairs: yes` and `x-set-second: 2`; on the response, replaces the map with `:status 203`,
//!   `x-set-resp-pairs: yes` and the original `content-length`/`content-type`.
//! * anything else — on the request: adds `x-added: one` and `x-added: two`, replaces
//!   `x-replace-me` with `replaced`, removes `x-remove-me` (set to None) and `x-remove-too`,
//!   and rewrites `:path` to the value of `x-rewrite-path` when present. On the response: adds
//!   `x-resp-added: yes`, replaces `x-upstream-tag` with `rewritten`, removes
//!   `x-upstream-secret`, and reports the `:status` it saw as `x-seen-status`.

use proxy_wasm::traits::HttpContext;
use proxy_wasm::types::Action;

use crate::{path_only, AbiStream};

pub fn on_request_headers(s: &mut AbiStream) -> Action {
    match path_only(&s.state.path) {
        "/echo" => {
            let pairs: Vec<(String, String)> = s
                .get_http_request_headers_bytes()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                .collect();
            let body = serde_json::to_vec(&pairs).unwrap_or_default();
            let probe = s
                .request_header("x-probe")
                .unwrap_or_else(|| "<none>".into());
            let method = s.request_header(":method").unwrap_or_default();
            let missing = if s.request_header("x-absent").is_none() {
                "none"
            } else {
                "some"
            };
            s.reply(
                200,
                &[
                    ("x-get-value", probe),
                    ("x-get-method", method),
                    ("x-get-missing", missing.to_string()),
                    ("content-type", "application/json".into()),
                ],
                &body,
            );
            Action::Pause
        }
        p if p.starts_with("/set-pairs") => {
            let keep_proto = p.contains("keep-proto");
            let mut pairs: Vec<(String, String)> = s
                .get_http_request_headers()
                .into_iter()
                .filter(|(k, _)| k.starts_with(':') || (keep_proto && k == "x-forwarded-proto"))
                .collect();
            pairs.push(("x-set-pairs".into(), "yes".into()));
            pairs.push(("x-set-second".into(), "2".into()));
            s.set_http_request_headers(
                pairs
                    .iter()
                    .map(|(k, v)| (k.as_str(), v.as_str()))
                    .collect(),
            );
            Action::Continue
        }
        "/edit-echo" => {
            edit_request(s);
            let pairs: Vec<(String, String)> = s.get_http_request_headers();
            let body = serde_json::to_vec(&pairs).unwrap_or_default();
            s.reply(200, &[("content-type", "application/json".into())], &body);
            Action::Pause
        }
        _ => {
            edit_request(s);
            Action::Continue
        }
    }
}

/// The request edits of the default variant (and of `/edit-echo`).
fn edit_request(s: &mut AbiStream) {
    s.add_http_request_header("x-added", "one");
    s.add_http_request_header("x-added", "two");
    s.set_http_request_header("x-replace-me", Some("replaced"));
    s.set_http_request_header("x-remove-me", None);
    s.remove_http_request_header("x-remove-too");
    if let Some(path) = s.request_header("x-rewrite-path") {
        s.set_http_request_header(":path", Some(&path));
    }
}

pub fn on_response_headers(s: &mut AbiStream) -> Action {
    if path_only(&s.state.path).starts_with("/set-pairs") {
        let keep: Vec<(String, String)> = s
            .get_http_response_headers()
            .into_iter()
            .filter(|(k, _)| k == "content-length" || k == "content-type")
            .collect();
        let mut pairs = vec![
            (":status".to_string(), "203".to_string()),
            ("x-set-resp-pairs".to_string(), "yes".to_string()),
        ];
        pairs.extend(keep);
        s.set_http_response_headers(
            pairs
                .iter()
                .map(|(k, v)| (k.as_str(), v.as_str()))
                .collect(),
        );
        return Action::Continue;
    }
    let status = s.get_http_response_header(":status").unwrap_or_default();
    s.add_http_response_header("x-resp-added", "yes");
    s.set_http_response_header("x-upstream-tag", Some("rewritten"));
    s.remove_http_response_header("x-upstream-secret");
    s.add_http_response_header("x-seen-status", &status);
    Action::Continue
}
