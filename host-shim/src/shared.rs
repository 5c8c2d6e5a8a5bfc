//! State shared by every VM of the process, as Envoy shares it across worker threads: shared data
//! with compare-and-swap, shared queues, the metric registry, and host-shim's own counters.

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use crate::abi::{metric, Status};

/// A queue-ready notification for the worker that registered a queue.
#[derive(Debug, Clone, Copy)]
pub struct QueueReady {
    pub queue_id: u32,
    pub root_context_id: u32,
}

#[derive(Default)]
struct Queue {
    vm_id: String,
    name: String,
    items: VecDeque<Vec<u8>>,
    /// (worker, root context) of each VM that registered the queue.
    owners: Vec<(usize, u32)>,
}

/// Per-queue bound: an enqueue beyond it fails instead of growing memory without end.
const QUEUE_CAPACITY: usize = 10_000;

#[derive(Debug, Clone)]
struct MetricEntry {
    name: String,
    kind: i32,
}

/// Counters host-shim keeps about itself.
#[derive(Default)]
pub struct HostCounters {
    pub requests: AtomicU64,
    pub local_responses: AtomicU64,
    pub upstream_errors: AtomicU64,
    pub vm_traps: AtomicU64,
    pub vm_replacements: AtomicU64,
    pub http_callouts: AtomicU64,
    pub http_callout_failures: AtomicU64,
    pub redis_callouts: AtomicU64,
    pub redis_callout_failures: AtomicU64,
    /// The failures by kind: no reply within the init timeout, refused before sending
    /// (malformed, or unsafe on a shared connection), and the rest (Redis unreachable, login
    /// refused, garbage answered, cluster not initialised).
    pub redis_callout_timeouts: AtomicU64,
    pub redis_callout_refusals: AtomicU64,
    pub redis_callout_unreachable: AtomicU64,
    pub fail_open_passes: AtomicU64,
    /// Connections closed at accept by the overload manager's connection limit (Envoy's
    /// `downstream_global_cx_overflow`).
    pub downstream_global_cx_overflow: AtomicU64,
}

impl HostCounters {
    /// (Prometheus name without prefix, help text, value) of every counter.
    pub fn snapshot(&self) -> [(&'static str, &'static str, u64); 14] {
        let v = |c: &AtomicU64| c.load(Ordering::Relaxed);
        [
            ("requests_total", "requests received", v(&self.requests)),
            (
                "local_responses_total",
                "responses sent by the plugin",
                v(&self.local_responses),
            ),
            (
                "upstream_errors_total",
                "upstream connect failures and timeouts",
                v(&self.upstream_errors),
            ),
            (
                "vm_traps_total",
                "plugin VM traps and deadline overruns",
                v(&self.vm_traps),
            ),
            (
                "vm_replacements_total",
                "VMs replaced after a failure",
                v(&self.vm_replacements),
            ),
            (
                "fail_open_passes_total",
                "requests passed through because the VM failed (fail_open)",
                v(&self.fail_open_passes),
            ),
            (
                "http_callouts_total",
                "dispatch_http_call calls",
                v(&self.http_callouts),
            ),
            (
                "http_callout_failures_total",
                "http callouts that failed to connect, timed out or were reset",
                v(&self.http_callout_failures),
            ),
            (
                "redis_callouts_total",
                "proxy_redis_call calls",
                v(&self.redis_callouts),
            ),
            (
                "redis_callout_failures_total",
                "redis calls that failed",
                v(&self.redis_callout_failures),
            ),
            (
                "redis_callout_timeouts_total",
                "redis calls with no reply within their timeout",
                v(&self.redis_callout_timeouts),
            ),
            (
                "redis_callout_refusals_total",
                "redis calls refused before sending: malformed, or unsafe on a shared connection",
                v(&self.redis_callout_refusals),
            ),
            (
                "redis_callout_unreachable_total",
                "redis calls that failed otherwise: Redis unreachable, login refused, not RESP",
                v(&self.redis_callout_unreachable),
            ),
            (
                "downstream_global_cx_overflow_total",
                "connections closed at accept by the overload manager's connection limit",
                v(&self.downstream_global_cx_overflow),
            ),
        ]
    }
}

type QueueNotifier = Box<dyn Fn(usize, QueueReady) + Send + Sync>;

pub struct SharedState {
    data: Mutex<HashMap<String, (Vec<u8>, u32)>>,
    queues: Mutex<Vec<Queue>>,
    metric_defs: Mutex<Vec<MetricEntry>>,
    metric_values: Mutex<Vec<i64>>,
    histograms: Mutex<HashMap<u32, Histogram>>,
    notifier: Mutex<Option<QueueNotifier>>,
    pub counters: HostCounters,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A VM trap never unwinds through these locks, so poisoning only follows a host bug; keep
    // serving with the data as it is rather than taking the process down.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Default for SharedState {
    fn default() -> Self {
        SharedState {
            data: Mutex::new(HashMap::new()),
            queues: Mutex::new(Vec::new()),
            metric_defs: Mutex::new(Vec::new()),
            metric_values: Mutex::new(Vec::new()),
            histograms: Mutex::new(HashMap::new()),
            notifier: Mutex::new(None),
            counters: HostCounters::default(),
        }
    }
}

impl SharedState {
    /// Installs how queue-ready notifications reach the workers.
    pub fn set_queue_notifier(&self, f: impl Fn(usize, QueueReady) + Send + Sync + 'static) {
        *lock(&self.notifier) = Some(Box::new(f));
    }

    // ---- shared data -------------------------------------------------------------------

    pub fn get_data(&self, key: &str) -> Option<(Vec<u8>, u32)> {
        lock(&self.data).get(key).cloned()
    }

    /// Sets `key`; with a non-zero `cas` the write only happens if it matches the current one.
    pub fn set_data(&self, key: &str, value: Vec<u8>, cas: u32) -> Status {
        let mut data = lock(&self.data);
        match data.get_mut(key) {
            Some((v, current)) => {
                if cas != 0 && cas != *current {
                    return Status::CasMismatch;
                }
                *v = value;
                *current = current.wrapping_add(1).max(1);
            }
            None => {
                if cas != 0 {
                    return Status::CasMismatch;
                }
                data.insert(key.to_string(), (value, 1));
            }
        }
        Status::Ok
    }

    // ---- shared queues -----------------------------------------------------------------

    /// Registers (or re-registers) a queue owned by `vm_id`; ids start at 1.
    pub fn register_queue(&self, vm_id: &str, name: &str, worker: usize, root: u32) -> u32 {
        let mut queues = lock(&self.queues);
        if let Some(i) = queues
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
        {
            let owners = &mut queues[i].owners;
            owners.retain(|(w, _)| *w != worker);
            owners.push((worker, root));
            return i as u32 + 1;
        }
        queues.push(Queue {
            vm_id: vm_id.to_string(),
            name: name.to_string(),
            items: VecDeque::new(),
            owners: vec![(worker, root)],
        });
        queues.len() as u32
    }

    pub fn resolve_queue(&self, vm_id: &str, name: &str) -> Option<u32> {
        lock(&self.queues)
            .iter()
            .position(|q| q.vm_id == vm_id && q.name == name)
            .map(|i| i as u32 + 1)
    }

    pub fn enqueue(&self, id: u32, item: Vec<u8>) -> Status {
        let owners = {
            let mut queues = lock(&self.queues);
            let Some(q) = queues.get_mut((id as usize).wrapping_sub(1)) else {
                return Status::NotFound;
            };
            if q.items.len() >= QUEUE_CAPACITY {
                return Status::InternalFailure;
            }
            q.items.push_back(item);
            q.owners.clone()
        };
        if let Some(notify) = lock(&self.notifier).as_ref() {
            for (worker, root) in owners {
                notify(
                    worker,
                    QueueReady {
                        queue_id: id,
                        root_context_id: root,
                    },
                );
            }
        }
        Status::Ok
    }

    pub fn dequeue(&self, id: u32) -> Result<Vec<u8>, Status> {
        let mut queues = lock(&self.queues);
        let q = queues
            .get_mut((id as usize).wrapping_sub(1))
            .ok_or(Status::NotFound)?;
        q.items.pop_front().ok_or(Status::Empty)
    }

    // ---- metrics -----------------------------------------------------------------------

    /// Defines a metric; the same name and type give the same id on every VM, as in Envoy.
    pub fn define_metric(&self, kind: i32, name: &str) -> Result<u32, Status> {
        if !(metric::COUNTER..=metric::HISTOGRAM).contains(&kind) || name.is_empty() {
            return Err(Status::BadArgument);
        }
        let mut defs = lock(&self.metric_defs);
        if let Some(i) = defs.iter().position(|m| m.name == name) {
            return if defs[i].kind == kind {
                Ok(i as u32)
            } else {
                Err(Status::BadArgument)
            };
        }
        defs.push(MetricEntry {
            name: name.to_string(),
            kind,
        });
        lock(&self.metric_values).push(0);
        Ok(defs.len() as u32 - 1)
    }

    fn metric_kind(&self, id: u32) -> Option<i32> {
        lock(&self.metric_defs).get(id as usize).map(|m| m.kind)
    }

    pub fn get_metric(&self, id: u32) -> Result<u64, Status> {
        let kind = self.metric_kind(id).ok_or(Status::NotFound)?;
        if kind == metric::HISTOGRAM {
            return Err(Status::BadArgument);
        }
        Ok(lock(&self.metric_values)[id as usize] as u64)
    }

    pub fn increment_metric(&self, id: u32, delta: i64) -> Status {
        match self.metric_kind(id) {
            None => Status::NotFound,
            Some(metric::HISTOGRAM) => Status::BadArgument,
            Some(metric::COUNTER) if delta < 0 => Status::BadArgument,
            Some(_) => {
                let mut values = lock(&self.metric_values);
                values[id as usize] = values[id as usize].saturating_add(delta);
                Status::Ok
            }
        }
    }

    pub fn record_metric(&self, id: u32, value: i64) -> Status {
        match self.metric_kind(id) {
            None => Status::NotFound,
            Some(metric::HISTOGRAM) => {
                lock(&self.histograms).entry(id).or_default().record(value);
                Status::Ok
            }
            Some(_) => {
                lock(&self.metric_values)[id as usize] = value;
                Status::Ok
            }
        }
    }

    /// Prometheus text exposition of the plugin's metrics as Envoy 1.40 prints a plugin's own
    /// stats (no `envoy_` prefix, an empty label set `{}`, histograms with Envoy's default
    /// buckets; counters, gauges, histograms, each sorted by name, so the output does not depend
    /// on the order the plugin defined them in), then host-shim's own counters.
    pub fn prometheus_text(&self, extra: &[(&str, &str, u64)]) -> String {
        let mut out = String::new();
        let defs = lock(&self.metric_defs).clone();
        let values: Vec<i64> = lock(&self.metric_values).clone();
        let hist = lock(&self.histograms).clone();
        let mut order: Vec<(i32, String, usize)> = defs
            .iter()
            .enumerate()
            .map(|(i, m)| (m.kind, sanitize_metric_name(&m.name), i))
            .collect();
        order.sort();
        for (_, name, i) in order {
            let m = &defs[i];
            match m.kind {
                metric::COUNTER => {
                    let _ = writeln!(out, "# TYPE {name} counter\n{name}{{}} {}", values[i]);
                }
                metric::GAUGE => {
                    let _ = writeln!(out, "# TYPE {name} gauge\n{name}{{}} {}", values[i]);
                }
                _ => {
                    let h = hist.get(&(i as u32)).cloned().unwrap_or_default();
                    let _ = writeln!(out, "# TYPE {name} histogram");
                    let mut cumulative = 0;
                    for (bound, n) in HISTOGRAM_BUCKETS.iter().zip(h.buckets) {
                        cumulative += n;
                        let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
                    }
                    let _ = writeln!(
                        out,
                        "{name}_bucket{{le=\"+Inf\"}} {}\n{name}_sum{{}} {}\n{name}_count{{}} {}",
                        h.count, h.sum, h.count
                    );
                }
            }
        }
        let own = self.counters.snapshot();
        for (name, help, value) in own.iter().chain(extra.iter()) {
            let _ = writeln!(
                out,
                "# HELP host_shim_{name} {help}\n# TYPE host_shim_{name} {}\nhost_shim_{name} {value}",
                if name.ends_with("_total") { "counter" } else { "gauge" }
            );
        }
        out
    }
}

/// Envoy's default histogram bucket bounds (`stats_config.histogram_bucket_settings` unset).
pub const HISTOGRAM_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0,
    60000.0, 300000.0, 600000.0, 1800000.0, 3600000.0,
];

/// One histogram's recorded values: a count per bucket of [`HISTOGRAM_BUCKETS`] (values above
/// the last bound only in `count`), their number and their sum.
#[derive(Debug, Clone, Default)]
struct Histogram {
    buckets: [u64; HISTOGRAM_BUCKETS.len()],
    count: u64,
    sum: i64,
}

impl Histogram {
    fn record(&mut self, value: i64) {
        if let Some(i) = HISTOGRAM_BUCKETS.iter().position(|b| value as f64 <= *b) {
            self.buckets[i] += 1;
        }
        self.count += 1;
        self.sum = self.sum.saturating_add(value);
    }
}

/// Prometheus names allow `[a-zA-Z0-9_:]`; everything else becomes `_`, as Envoy does.
pub fn sanitize_metric_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cas_protects_concurrent_writers() {
        let s = SharedState::default();
        assert_eq!(s.set_data("k", b"a".to_vec(), 0), Status::Ok);
        let (_, cas) = s.get_data("k").unwrap();
        assert_eq!(s.set_data("k", b"b".to_vec(), cas), Status::Ok);
        assert_eq!(s.set_data("k", b"c".to_vec(), cas), Status::CasMismatch);
        assert_eq!(s.get_data("k").unwrap().0, b"b");
        assert_eq!(s.set_data("new", b"x".to_vec(), 7), Status::CasMismatch);
    }

    #[test]
    fn metric_names_are_shared_and_typed() {
        let s = SharedState::default();
        let a = s.define_metric(metric::COUNTER, "krowoc.hits").unwrap();
        assert_eq!(s.define_metric(metric::COUNTER, "krowoc.hits"), Ok(a));
        assert_eq!(
            s.define_metric(metric::GAUGE, "krowoc.hits"),
            Err(Status::BadArgument)
        );
        assert_eq!(s.increment_metric(a, 2), Status::Ok);
        assert_eq!(s.increment_metric(a, -1), Status::BadArgument);
        assert_eq!(s.get_metric(a), Ok(2));
        assert!(s
            .prometheus_text(&[])
            .contains("# TYPE krowoc_hits counter\nkrowoc_hits{} 2"));
    }

    #[test]
    fn metrics_are_listed_as_envoy_lists_them_whatever_the_definition_order() {
        let s = SharedState::default();
        s.define_metric(metric::GAUGE, "b.gauge").unwrap();
        s.define_metric(metric::COUNTER, "z.count").unwrap();
        s.define_metric(metric::HISTOGRAM, "a.hist").unwrap();
        s.define_metric(metric::COUNTER, "a.count").unwrap();
        let text = s.prometheus_text(&[]);
        let names: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE "))
            .filter(|l| !l.starts_with("host_shim_"))
            .map(|l| l.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(names, ["a_count", "z_count", "b_gauge", "a_hist"]);
    }

    #[test]
    fn histograms_have_envoys_cumulative_buckets_sum_and_count() {
        let s = SharedState::default();
        let h = s.define_metric(metric::HISTOGRAM, "krowoc.batch").unwrap();
        for v in [1, 3, 32, 5_000_000] {
            assert_eq!(s.record_metric(h, v), Status::Ok);
        }
        let text = s.prometheus_text(&[]);
        for line in [
            "# TYPE krowoc_batch histogram",
            "krowoc_batch_bucket{le=\"0.5\"} 0",
            "krowoc_batch_bucket{le=\"1\"} 1",
            "krowoc_batch_bucket{le=\"5\"} 2",
            "krowoc_batch_bucket{le=\"50\"} 3",
            "krowoc_batch_bucket{le=\"3600000\"} 3",
            "krowoc_batch_bucket{le=\"+Inf\"} 4",
            "krowoc_batch_sum{} 5000036",
            "krowoc_batch_count{} 4",
        ] {
            assert!(
                text.lines().any(|l| l == line),
                "{line:?} missing from:\n{text}"
            );
        }
    }

    #[test]
    fn queue_is_fifo_and_reports_empty() {
        let s = SharedState::default();
        let id = s.register_queue("vm", "q", 0, 1);
        assert_eq!(s.resolve_queue("vm", "q"), Some(id));
        assert_eq!(s.resolve_queue("other", "q"), None);
        assert_eq!(s.enqueue(id, b"1".to_vec()), Status::Ok);
        assert_eq!(s.enqueue(id, b"2".to_vec()), Status::Ok);
        assert_eq!(s.dequeue(id), Ok(b"1".to_vec()));
        assert_eq!(s.dequeue(id), Ok(b"2".to_vec()));
        assert_eq!(s.dequeue(id), Err(Status::Empty));
        assert_eq!(s.dequeue(99), Err(Status::NotFound));
    }
}
