//! Shared queues: `proxy_register_shared_queue`, `proxy_resolve_shared_queue`,
//! `proxy_enqueue_shared_queue`, `proxy_dequeue_shared_queue`, and `proxy_on_queue_ready`.
//!
//! Every VM registers `abi_queue` when configured (`x-registered-id` on replies).
//! * `/enqueue?item=X` — resolves the queue by (this VM's `plugin_vm_id`, `abi_queue`) and
//!   enqueues X: `x-resolved-id`, `x-enqueue: Ok` or the failing status.
//! * `/enqueue-unknown` — enqueues to a queue id nobody registered: `x-enqueue`.
//! * `/resolve-missing` — resolves a name nobody registered: `x-resolved: none|<id>`.
//! * `/dequeue` — dequeues one item: `x-dequeued: <item>|empty|<status>`.
//! * `proxy_on_queue_ready` drains the queue, appending each item to `abi/dequeued` (comma
//!   separated) in shared data.

use proxy_wasm::traits::Context;
use proxy_wasm::types::Action;

use crate::{cas_append, path_only, query_param, AbiRoot, AbiStream};

pub const QUEUE_NAME: &str = "abi_queue";

pub fn register(root: &AbiRoot) -> u32 {
    root.register_shared_queue(QUEUE_NAME)
}

fn vm_id(s: &AbiStream) -> String {
    s.get_property(vec!["plugin_vm_id"])
        .map(|v| String::from_utf8_lossy(&v).into_owned())
        .unwrap_or_default()
}

pub fn on_request_headers(s: &mut AbiStream) -> Action {
    let path = s.state.path.clone();
    let registered = ("x-registered-id", s.info.queue_id.to_string());
    match path_only(&path) {
        "/enqueue" => {
            let item = query_param(&path, "item").unwrap_or_default();
            match s.resolve_shared_queue(&vm_id(s), QUEUE_NAME) {
                Some(id) => {
                    let status = match s.enqueue_shared_queue(id, Some(item.as_bytes())) {
                        Ok(()) => "Ok".to_string(),
                        Err(e) => format!("{e:?}"),
                    };
                    s.reply(
                        200,
                        &[
                            registered,
                            ("x-resolved-id", id.to_string()),
                            ("x-enqueue", status),
                        ],
                        b"",
                    );
                }
                None => s.reply(500, &[registered, ("x-resolved-id", "none".into())], b""),
            }
        }
        "/enqueue-unknown" => {
            let status = match s.enqueue_shared_queue(0xFFFF, Some(b"lost")) {
                Ok(()) => "Ok".to_string(),
                Err(e) => format!("{e:?}"),
            };
            s.reply(200, &[registered, ("x-enqueue", status)], b"");
        }
        "/resolve-missing" => {
            let resolved = match s.resolve_shared_queue(&vm_id(s), "no_such_queue") {
                Some(id) => id.to_string(),
                None => "none".into(),
            };
            s.reply(200, &[registered, ("x-resolved", resolved)], b"");
        }
        "/dequeue" => {
            let dequeued = match s.dequeue_shared_queue(s.info.queue_id) {
                Ok(Some(v)) => String::from_utf8_lossy(&v).into_owned(),
                Ok(None) => "empty".into(),
                Err(e) => format!("{e:?}"),
            };
            s.reply(200, &[registered, ("x-dequeued", dequeued)], b"");
        }
        other => s.reply(404, &[], format!("no queue variant {other}").as_bytes()),
    }
    Action::Pause
}

pub fn on_queue_ready(root: &AbiRoot, queue_id: u32) {
    while let Ok(Some(item)) = root.dequeue_shared_queue(queue_id) {
        cas_append(root, "abi/dequeued", &String::from_utf8_lossy(&item));
    }
}
