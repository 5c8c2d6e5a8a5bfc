//! Plugin VMs: the module compiled once per process ([`PluginModule`]), and one instance per
//! worker thread ([`Vm`]) driven through the ABI's lifecycle — `_initialize`, root context,
//! `on_vm_start`, `on_configure` — and then the per-stream callbacks.
//!
//! Every callback runs under an epoch deadline (a runaway plugin traps instead of hanging the
//! worker) and inside a memory cap. A trap poisons the VM: the caller fails the request and
//! treats later ones by the filter's [`FailurePolicy`] (only `FAIL_RELOAD` replaces the VM).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use wasmtime::{
    Config, Engine, Instance, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, Store, StoreLimitsBuilder, TypedFunc, WasmParams, WasmResults,
};

use crate::abi::Action;
use crate::shared::SharedState;
use crate::state::{HostState, Phase, StreamState, VmIdentity};

/// The length of one epoch tick; callback deadlines are counted in these.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How a VM is created and bounded.
#[derive(Debug, Clone)]
pub struct VmSettings {
    pub plugin_name: String,
    pub root_id: String,
    pub vm_id: String,
    pub vm_configuration: Vec<u8>,
    pub plugin_configuration: Vec<u8>,
    /// The longest a single callback may run before the VM is stopped.
    pub callback_deadline: Duration,
    /// Linear memory cap per VM.
    pub memory_limit_bytes: usize,
    pub env: Vec<(String, String)>,
    pub log_level: i32,
    /// Also write the plugin's log lines here (`host-shim run --log-path`).
    pub log_file: Option<Arc<crate::host::misc::PluginLogFile>>,
}

/// What happens to requests once a plugin's VM has failed (trapped), as Envoy 1.40 does it
/// (`failure_policy` in the Wasm filter's `config`, or the deprecated `fail_open`). Measured with
/// Envoy 1.40: the request whose callback trapped gets 503 with an empty body (only
/// `content-length: 0`), except with `fail_open: true`, which passes it on; afterwards:
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailurePolicy {
    /// The default (`UNSPECIFIED`, `FAIL_CLOSED`): the plugin stays failed and every later
    /// request gets the same empty 503; the VM is never reloaded.
    #[default]
    FailClosed,
    /// `FAIL_RELOAD`: the first request at least the reload interval after the VM's last load
    /// starts a new VM and is served by it; earlier ones get the empty 503.
    FailReload,
    /// `FAIL_OPEN`: later requests bypass the failed plugin (the failing one still got 503).
    FailOpen,
    /// The deprecated `fail_open: true` (with `failure_policy` unset): the failing request and
    /// every later one bypass the plugin.
    FailOpenLegacy,
}

impl FailurePolicy {
    /// Envoy's reading of the two fields: `failure_policy` other than `UNSPECIFIED` together with
    /// `fail_open: true` is refused ("only one of fail_open or failure_policy can be set").
    pub fn from_envoy(fail_open: bool, failure_policy: Option<&str>) -> Result<Self, String> {
        match (failure_policy.unwrap_or("UNSPECIFIED"), fail_open) {
            ("UNSPECIFIED", false) => Ok(FailurePolicy::FailClosed),
            ("UNSPECIFIED", true) => Ok(FailurePolicy::FailOpenLegacy),
            (_, true) => Err("only one of fail_open or failure_policy can be set".into()),
            ("FAIL_CLOSED", false) => Ok(FailurePolicy::FailClosed),
            ("FAIL_RELOAD", false) => Ok(FailurePolicy::FailReload),
            ("FAIL_OPEN", false) => Ok(FailurePolicy::FailOpen),
            (other, false) => Err(format!("unknown failure_policy {other:?}")),
        }
    }

    /// Whether the request whose callback failed passes on without the plugin.
    pub fn passes_failing_request(self) -> bool {
        self == FailurePolicy::FailOpenLegacy
    }

    /// Whether requests after the failure bypass the plugin (instead of getting 503).
    pub fn skips_failed_plugin(self) -> bool {
        matches!(
            self,
            FailurePolicy::FailOpen | FailurePolicy::FailOpenLegacy
        )
    }

    /// Whether a failed VM is replaced by a new one.
    pub fn reloads(self) -> bool {
        self == FailurePolicy::FailReload
    }
}

/// Why a plugin could not be loaded, started or run.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot read plugin {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("plugin {path} is not a valid wasm module: {message}")]
    Compile { path: PathBuf, message: String },
    #[error("plugin {path}: {message}")]
    Link { path: PathBuf, message: String },
    /// The module declares no proxy-wasm ABI version host-shim speaks (Envoy refuses such a
    /// module at load: "Missing or unknown Proxy-Wasm ABI version").
    #[error("plugin {path}: {message}")]
    AbiVersion { path: PathBuf, message: String },
    #[error("plugin failed to start: {0}")]
    Start(String),
    #[error("plugin refused its configuration (proxy_on_configure returned false){}", lines_suffix(.0))]
    ConfigurationRefused(Vec<String>),
    #[error("plugin VM trapped: {0}")]
    Trap(String),
}

impl VmError {
    pub fn is_trap(&self) -> bool {
        matches!(self, VmError::Trap(_))
    }
}

fn lines_suffix(lines: &[String]) -> String {
    if lines.is_empty() {
        String::new()
    } else {
        format!("; the plugin logged:\n  {}", lines.join("\n  "))
    }
}

/// VMs a process can hold at once (workers, replacements in flight, and in tests several
/// gateways in one process); sizes the instance pool.
const MAX_VMS: u32 = 256;

fn engine_config(pooling: bool) -> Config {
    let mut config = Config::new();
    config.epoch_interruption(true);
    config.max_wasm_stack(1 << 20);
    // For profiling a plugin with `perf`: the JIT code's symbols go to /tmp/perf-<pid>.map.
    if std::env::var_os("HOST_SHIM_PERF_MAP").is_some() {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    if pooling {
        // Host functions that hand data to the guest call its allocator on a nested fiber;
        // pooled stacks make that a free-list operation instead of an mmap/munmap pair (and its
        // TLB shootdown) on every request.
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(MAX_VMS)
            .total_memories(MAX_VMS)
            .total_tables(MAX_VMS)
            .total_stacks(MAX_VMS * 2)
            .total_component_instances(0)
            .total_gc_heaps(0)
            .table_elements(100_000)
            .async_stack_keep_resident(128 * 1024);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    }
    config
}

fn engine() -> &'static Engine {
    static ENGINE: OnceLock<Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let engine = Engine::new(&engine_config(true))
            .or_else(|e| {
                // A process with a small virtual-memory limit cannot reserve the pool.
                tracing::warn!(
                    "pooling instance allocator unavailable ({e:#}); allocating on demand"
                );
                Engine::new(&engine_config(false))
            })
            .unwrap_or_else(|e| {
                // The configuration above is static: failing here is a build problem, not input.
                panic!("wasmtime engine configuration rejected: {e}")
            });
        let ticker = engine.clone();
        std::thread::Builder::new()
            .name("epoch-ticker".into())
            .spawn(move || loop {
                std::thread::sleep(EPOCH_TICK);
                ticker.increment_epoch();
            })
            .map(|_| ())
            .unwrap_or_else(|e| panic!("cannot start the epoch thread: {e}"));
        engine
    })
}

/// A plugin compiled and linked once per process; every worker instantiates it.
pub struct PluginModule {
    pre: InstancePre<HostState>,
    pub path: PathBuf,
}

/// Compiled modules by path, so that tests starting many gateways compile each plugin once.
fn module_cache() -> &'static std::sync::Mutex<HashMap<(PathBuf, u64), Module>> {
    static CACHE: OnceLock<std::sync::Mutex<HashMap<(PathBuf, u64), Module>>> = OnceLock::new();
    CACHE.get_or_init(Default::default)
}

impl PluginModule {
    pub fn load(path: &Path) -> Result<Arc<PluginModule>, VmError> {
        let bytes = std::fs::read(path).map_err(|source| VmError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_bytes(path, &bytes)
    }

    pub fn from_bytes(path: &Path, bytes: &[u8]) -> Result<Arc<PluginModule>, VmError> {
        let key = (path.to_path_buf(), fingerprint(bytes));
        let cached = module_cache()
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let module = match cached {
            Some(m) => m,
            None => {
                let m = Module::new(engine(), bytes).map_err(|e| VmError::Compile {
                    path: path.to_path_buf(),
                    message: format!("{e:#}"),
                })?;
                module_cache()
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(key, m.clone());
                m
            }
        };
        check_abi_version(&module).map_err(|message| VmError::AbiVersion {
            path: path.to_path_buf(),
            message,
        })?;
        let mut linker: Linker<HostState> = Linker::new(engine());
        crate::host::add_to_linker(&mut linker).map_err(|e| VmError::Link {
            path: path.to_path_buf(),
            message: format!("{e:#}"),
        })?;
        let pre = linker.instantiate_pre(&module).map_err(|e| {
            let message = match e.downcast_ref::<wasmtime::UnknownImportError>() {
                Some(missing) => format!(
                    "imports `{}::{}`, which host-shim does not provide",
                    missing.module(),
                    missing.name()
                ),
                None => format!("{e:#}"),
            };
            VmError::Link {
                path: path.to_path_buf(),
                message,
            }
        })?;
        Ok(Arc::new(PluginModule {
            pre,
            path: path.to_path_buf(),
        }))
    }
}

/// The ABI versions host-shim runs, as the export that declares each. Envoy 1.40 accepts 0.2.1
/// and 0.2.0 (one import set for both) and 0.1.0; Higress registers its Redis calls for 0.2.1
/// and its own 0.2.100.
const ABI_VERSION_EXPORTS: &[&str] = &[
    "proxy_abi_version_0_2_1",
    "proxy_abi_version_0_2_0",
    "proxy_abi_version_0_2_100",
];

/// Envoy refuses a module without a known `proxy_abi_version_*` export before linking it; so does
/// host-shim, naming the exports it looked for. ABI 0.1.0 (other callbacks and imports) is
/// refused too: Envoy would load it, host-shim does not implement it.
fn check_abi_version(module: &Module) -> Result<(), String> {
    let exports: Vec<&str> = module.exports().map(|e| e.name()).collect();
    if exports.iter().any(|e| ABI_VERSION_EXPORTS.contains(e)) {
        return Ok(());
    }
    if exports.contains(&"proxy_abi_version_0_1_0") {
        return Err(
            "exports proxy_abi_version_0_1_0: proxy-wasm ABI 0.1.0 is not implemented \
                    by host-shim (it runs 0.2.0 and 0.2.1)"
                .into(),
        );
    }
    let declared: Vec<&str> = exports
        .iter()
        .copied()
        .filter(|e| e.starts_with("proxy_abi_version_"))
        .collect();
    let found = if declared.is_empty() {
        "none".to_string()
    } else {
        declared.join(", ")
    };
    Err(format!(
        "missing or unknown proxy-wasm ABI version: the module exports none of {} (found: {found}), \
         so Envoy refuses it too",
        ABI_VERSION_EXPORTS.join(", ")
    ))
}

fn fingerprint(bytes: &[u8]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    bytes.hash(&mut h);
    h.finish()
}

type Cb1 = TypedFunc<i32, ()>;
type Cb1R = TypedFunc<i32, i32>;
type Cb2 = TypedFunc<(i32, i32), ()>;
type Cb2R = TypedFunc<(i32, i32), i32>;
type Cb3R = TypedFunc<(i32, i32, i32), i32>;
type Cb4 = TypedFunc<(i32, i32, i32, i32), ()>;
type Cb5 = TypedFunc<(i32, i32, i32, i32, i32), ()>;

/// A stream callback export: with an end-of-stream flag (headers, body) or without (trailers).
enum StreamCallback<'a> {
    WithEos(Option<&'a Cb3R>, bool),
    Plain(Option<&'a Cb2R>),
}

/// The plugin's exports host-shim calls; absent optional ones behave like the SDK's defaults.
struct Exports {
    context_create: Cb2,
    vm_start: Option<Cb2R>,
    configure: Option<Cb2R>,
    tick: Option<Cb1>,
    queue_ready: Option<Cb2>,
    request_headers: Option<Cb3R>,
    request_body: Option<Cb3R>,
    request_trailers: Option<Cb2R>,
    response_headers: Option<Cb3R>,
    response_body: Option<Cb3R>,
    response_trailers: Option<Cb2R>,
    http_call_response: Option<Cb5>,
    redis_call_response: Option<Cb4>,
    done: Option<Cb1R>,
    log: Option<Cb1>,
    delete: Option<Cb1>,
}

fn export<P: WasmParams, R: WasmResults>(
    store: &mut Store<HostState>,
    instance: &Instance,
    name: &str,
) -> Result<Option<TypedFunc<P, R>>, VmError> {
    if instance.get_func(&mut *store, name).is_none() {
        return Ok(None);
    }
    instance
        .get_typed_func::<P, R>(&mut *store, name)
        .map(Some)
        .map_err(|e| VmError::Start(format!("export `{name}` has the wrong signature: {e}")))
}

/// One plugin instance: one per worker thread, as in Envoy.
pub struct Vm {
    store: Store<HostState>,
    /// Shared so that a call can hold an export while the VM is borrowed mutably (cloning a
    /// `TypedFunc` clones its registered type: measurable per callback).
    exports: Arc<Exports>,
    next_context_id: u32,
    deadline_ticks: u64,
    /// Set once the VM has trapped; it must not be called again.
    pub failed: Option<String>,
}

/// The root context id every VM uses.
pub const ROOT_CONTEXT_ID: u32 = 1;

impl Vm {
    /// Instantiates the plugin and runs its start-up: `_initialize`, `main`/`_start`, the root
    /// context, `proxy_on_vm_start` and `proxy_on_configure`.
    pub async fn start(
        module: &PluginModule,
        settings: &VmSettings,
        worker: usize,
        shared: Arc<SharedState>,
        clusters: Arc<HashMap<String, crate::envoy_config::SocketAddress>>,
    ) -> Result<Vm, VmError> {
        let state = HostState {
            wasi: crate::host::wasi::wasi_context(&settings.plugin_name, &settings.env),
            limits: StoreLimitsBuilder::new()
                .memory_size(settings.memory_limit_bytes)
                .instances(1)
                .memories(1)
                .tables(4)
                .build(),
            shared,
            identity: VmIdentity {
                worker,
                plugin_name: settings.plugin_name.clone(),
                root_id: settings.root_id.clone(),
                vm_id: settings.vm_id.clone(),
            },
            vm_configuration: settings.vm_configuration.clone(),
            plugin_configuration: settings.plugin_configuration.clone(),
            clusters,
            root_context_id: ROOT_CONTEXT_ID,
            current_context: ROOT_CONTEXT_ID,
            streams: HashMap::new(),
            callouts: Vec::new(),
            next_token: 0,
            http_call_response: None,
            redis_call_response: None,
            redis_clusters: HashMap::new(),
            tick_period: None,
            log_level: settings.log_level,
            log_file: settings.log_file.clone(),
            recent_errors: Vec::new(),
            memory: None,
            guest_alloc: None,
        };
        let mut store = Store::new(engine(), state);
        store.limiter(|s| &mut s.limits);
        store.epoch_deadline_trap();
        let deadline_ticks =
            (settings.callback_deadline.as_millis() / EPOCH_TICK.as_millis()).max(1) as u64 + 1;
        store.set_epoch_deadline(deadline_ticks);
        let instance = module
            .pre
            .instantiate_async(&mut store)
            .await
            .map_err(|e| VmError::Start(format!("{e:#}")))?;
        // Before any guest code runs: even `_initialize` may make hostcalls.
        let memory = instance.get_memory(&mut store, "memory");
        let guest_alloc = ["malloc", "proxy_on_memory_allocate"]
            .into_iter()
            .find_map(|name| instance.get_func(&mut store, name))
            .and_then(|f| f.typed::<i32, i32>(&store).ok())
            .map(Arc::new);
        store.data_mut().memory = memory;
        store.data_mut().guest_alloc = guest_alloc;

        let Some(context_create) =
            export::<(i32, i32), ()>(&mut store, &instance, "proxy_on_context_create")?
        else {
            return Err(VmError::Start(
                "the module does not export proxy_on_context_create: not a proxy-wasm plugin"
                    .into(),
            ));
        };
        let exports = Exports {
            context_create,
            vm_start: export(&mut store, &instance, "proxy_on_vm_start")?,
            configure: export(&mut store, &instance, "proxy_on_configure")?,
            tick: export(&mut store, &instance, "proxy_on_tick")?,
            queue_ready: export(&mut store, &instance, "proxy_on_queue_ready")?,
            request_headers: export(&mut store, &instance, "proxy_on_request_headers")?,
            request_body: export(&mut store, &instance, "proxy_on_request_body")?,
            request_trailers: export(&mut store, &instance, "proxy_on_request_trailers")?,
            response_headers: export(&mut store, &instance, "proxy_on_response_headers")?,
            response_body: export(&mut store, &instance, "proxy_on_response_body")?,
            response_trailers: export(&mut store, &instance, "proxy_on_response_trailers")?,
            http_call_response: export(&mut store, &instance, "proxy_on_http_call_response")?,
            redis_call_response: export(&mut store, &instance, "proxy_on_redis_call_response")?,
            done: export(&mut store, &instance, "proxy_on_done")?,
            log: export(&mut store, &instance, "proxy_on_log")?,
            delete: export(&mut store, &instance, "proxy_on_delete")?,
        };
        let has_initialize = instance.get_func(&mut store, "_initialize").is_some();
        if let Some(init) = export::<(), ()>(&mut store, &instance, "_initialize")? {
            init.call_async(&mut store, ())
                .await
                .map_err(|e| VmError::Start(format!("_initialize trapped: {e:#}")))?;
        }
        if let Some(main) = export::<(i32, i32), i32>(&mut store, &instance, "main")? {
            main.call_async(&mut store, (0, 0))
                .await
                .map_err(|e| VmError::Start(format!("main trapped: {e:#}")))?;
        } else if !has_initialize {
            if let Some(start) = export::<(), ()>(&mut store, &instance, "_start")? {
                start
                    .call_async(&mut store, ())
                    .await
                    .map_err(|e| VmError::Start(format!("_start trapped: {e:#}")))?;
            }
        }
        let mut vm = Vm {
            store,
            exports: Arc::new(exports),
            next_context_id: ROOT_CONTEXT_ID + 1,
            deadline_ticks,
            failed: None,
        };
        let root = ROOT_CONTEXT_ID as i32;
        let f = vm.exports.context_create.clone();
        vm.call(ROOT_CONTEXT_ID, &f, (root, 0))
            .await
            .map_err(|e| VmError::Start(e.to_string()))?;
        if let Some(f) = vm.exports.vm_start.clone() {
            let size = settings.vm_configuration.len() as i32;
            let ok = vm
                .call(ROOT_CONTEXT_ID, &f, (root, size))
                .await
                .map_err(|e| VmError::Start(e.to_string()))?;
            if ok == 0 {
                return Err(VmError::Start(format!(
                    "proxy_on_vm_start returned false{}",
                    lines_suffix(&vm.store.data().recent_errors)
                )));
            }
        }
        if let Some(f) = vm.exports.configure.clone() {
            let size = settings.plugin_configuration.len() as i32;
            let ok = vm
                .call(ROOT_CONTEXT_ID, &f, (root, size))
                .await
                .map_err(|e| VmError::Start(e.to_string()))?;
            if ok == 0 {
                return Err(VmError::ConfigurationRefused(
                    vm.store.data().recent_errors.clone(),
                ));
            }
        }
        Ok(vm)
    }

    pub fn state(&self) -> &HostState {
        self.store.data()
    }

    pub fn state_mut(&mut self) -> &mut HostState {
        self.store.data_mut()
    }

    pub fn stream(&mut self, ctx: u32) -> Option<&mut StreamState> {
        self.store.data_mut().streams.get_mut(&ctx)
    }

    /// Calls one export with `ctx` as the effective context, under the callback deadline.
    async fn call<P: WasmParams + Sync, R: WasmResults + Sync>(
        &mut self,
        ctx: u32,
        f: &TypedFunc<P, R>,
        params: P,
    ) -> Result<R, VmError> {
        if let Some(reason) = &self.failed {
            return Err(VmError::Trap(reason.clone()));
        }
        self.store.data_mut().current_context = ctx;
        self.store.set_epoch_deadline(self.deadline_ticks);
        match f.call_async(&mut self.store, params).await {
            Ok(r) => Ok(r),
            Err(e) => {
                let reason = match e.downcast_ref::<wasmtime::Trap>() {
                    Some(wasmtime::Trap::Interrupt) => {
                        "callback ran past its deadline (interrupted)".to_string()
                    }
                    _ => format!("{e:#}"),
                };
                let counters = &self.store.data().shared.counters;
                counters.vm_traps.fetch_add(1, Ordering::Relaxed);
                tracing::error!(
                    worker = self.store.data().identity.worker,
                    "plugin VM failed: {reason}"
                );
                self.failed = Some(reason.clone());
                Err(VmError::Trap(reason))
            }
        }
    }

    /// Creates a context for a new HTTP stream.
    pub async fn create_stream(&mut self, stream: StreamState) -> Result<u32, VmError> {
        // A failed VM stays in place under most policies: keep no state for streams it refuses.
        if let Some(reason) = &self.failed {
            return Err(VmError::Trap(reason.clone()));
        }
        let id = self.next_context_id;
        self.next_context_id = self
            .next_context_id
            .wrapping_add(1)
            .max(ROOT_CONTEXT_ID + 1);
        self.store.data_mut().streams.insert(id, stream);
        let exports = Arc::clone(&self.exports);
        self.call(
            id,
            &exports.context_create,
            (id as i32, ROOT_CONTEXT_ID as i32),
        )
        .await?;
        Ok(id)
    }

    /// Runs one stream callback `f(ctx, a[, eos])` in `phase`: the header maps the plugin can
    /// reach follow Envoy's phases ([`StreamState::enter`]).
    async fn stream_callback(
        &mut self,
        ctx: u32,
        phase: Phase,
        f: StreamCallback<'_>,
        a: usize,
    ) -> Result<Action, VmError> {
        if let Some(s) = self.stream(ctx) {
            s.enter(phase);
        }
        let raw = match f {
            StreamCallback::WithEos(Some(f), eos) => {
                self.call(ctx, f, (ctx as i32, a as i32, eos as i32))
                    .await?
            }
            StreamCallback::Plain(Some(f)) => self.call(ctx, f, (ctx as i32, a as i32)).await?,
            StreamCallback::WithEos(None, _) | StreamCallback::Plain(None) => 0,
        };
        let action = Action::from_i32(raw);
        if let Some(s) = self.stream(ctx) {
            s.leave(phase, action);
        }
        Ok(action)
    }

    pub async fn on_request_headers(&mut self, ctx: u32, eos: bool) -> Result<Action, VmError> {
        let n = self.stream(ctx).map_or(0, |s| s.request_headers.len());
        let exports = Arc::clone(&self.exports);
        let f = StreamCallback::WithEos(exports.request_headers.as_ref(), eos);
        self.stream_callback(ctx, Phase::RequestHeaders, f, n).await
    }

    pub async fn on_request_body(
        &mut self,
        ctx: u32,
        size: usize,
        eos: bool,
    ) -> Result<Action, VmError> {
        let exports = Arc::clone(&self.exports);
        let f = StreamCallback::WithEos(exports.request_body.as_ref(), eos);
        self.stream_callback(ctx, Phase::RequestBody, f, size).await
    }

    pub async fn on_request_trailers(&mut self, ctx: u32, n: usize) -> Result<Action, VmError> {
        let exports = Arc::clone(&self.exports);
        let f = StreamCallback::Plain(exports.request_trailers.as_ref());
        self.stream_callback(ctx, Phase::RequestTrailers, f, n)
            .await
    }

    pub async fn on_response_headers(&mut self, ctx: u32, eos: bool) -> Result<Action, VmError> {
        let n = self
            .stream(ctx)
            .and_then(|s| s.response_headers.as_ref().map(|h| h.len()))
            .unwrap_or(0);
        let exports = Arc::clone(&self.exports);
        let f = StreamCallback::WithEos(exports.response_headers.as_ref(), eos);
        self.stream_callback(ctx, Phase::ResponseHeaders, f, n)
            .await
    }

    pub async fn on_response_body(
        &mut self,
        ctx: u32,
        size: usize,
        eos: bool,
    ) -> Result<Action, VmError> {
        let exports = Arc::clone(&self.exports);
        let f = StreamCallback::WithEos(exports.response_body.as_ref(), eos);
        let action = self
            .stream_callback(ctx, Phase::ResponseBody, f, size)
            .await?;
        if action == Action::Continue {
            // What is buffered now goes to the client.
            if let Some(s) = self.stream(ctx) {
                s.response_body_sent += s.response_body.len();
            }
        }
        Ok(action)
    }

    pub async fn on_response_trailers(&mut self, ctx: u32, n: usize) -> Result<Action, VmError> {
        let exports = Arc::clone(&self.exports);
        let f = StreamCallback::Plain(exports.response_trailers.as_ref());
        self.stream_callback(ctx, Phase::ResponseTrailers, f, n)
            .await
    }

    /// `on_done`, `on_log`, `on_delete`, then forgets the stream.
    pub async fn finish_stream(&mut self, ctx: u32) -> Result<(), VmError> {
        let exports = Arc::clone(&self.exports);
        if let Some(s) = self.stream(ctx) {
            s.enter(Phase::Log);
        }
        let result = async {
            if let Some(f) = &exports.done {
                self.call(ctx, f, ctx as i32).await?;
            }
            if let Some(f) = &exports.log {
                self.call(ctx, f, ctx as i32).await?;
            }
            if let Some(f) = &exports.delete {
                self.call(ctx, f, ctx as i32).await?;
            }
            Ok(())
        }
        .await;
        self.store.data_mut().streams.remove(&ctx);
        result
    }

    pub async fn on_tick(&mut self) -> Result<(), VmError> {
        let exports = Arc::clone(&self.exports);
        if let Some(f) = &exports.tick {
            self.call(ROOT_CONTEXT_ID, f, ROOT_CONTEXT_ID as i32)
                .await?;
        }
        Ok(())
    }

    pub async fn on_queue_ready(&mut self, root: u32, queue_id: u32) -> Result<(), VmError> {
        let exports = Arc::clone(&self.exports);
        if let Some(f) = &exports.queue_ready {
            self.call(root, f, (root as i32, queue_id as i32)).await?;
        }
        Ok(())
    }

    /// Delivers an HTTP callout's answer (the response is already in the host state).
    pub async fn on_http_call_response(
        &mut self,
        token: u32,
        n_headers: usize,
        body_size: usize,
        n_trailers: usize,
    ) -> Result<(), VmError> {
        let exports = Arc::clone(&self.exports);
        let result = match &exports.http_call_response {
            Some(f) => {
                self.call(
                    ROOT_CONTEXT_ID,
                    f,
                    (
                        ROOT_CONTEXT_ID as i32,
                        token as i32,
                        n_headers as i32,
                        body_size as i32,
                        n_trailers as i32,
                    ),
                )
                .await
            }
            None => Ok(()),
        };
        self.store.data_mut().http_call_response = None;
        result
    }

    /// Delivers a Redis call's answer (Higress): `status` 0 is success, the reply in buffer 9.
    pub async fn on_redis_call_response(
        &mut self,
        token: u32,
        status: i32,
        reply: Option<Vec<u8>>,
    ) -> Result<(), VmError> {
        let size = reply.as_ref().map_or(0, |r| r.len());
        self.store.data_mut().redis_call_response = reply;
        let exports = Arc::clone(&self.exports);
        let result = match &exports.redis_call_response {
            Some(f) => {
                self.call(
                    ROOT_CONTEXT_ID,
                    f,
                    (ROOT_CONTEXT_ID as i32, token as i32, status, size as i32),
                )
                .await
            }
            None => Ok(()),
        };
        self.store.data_mut().redis_call_response = None;
        result
    }

    /// Takes the callouts queued by the last callbacks.
    pub fn take_callouts(&mut self) -> Vec<crate::state::Callout> {
        std::mem::take(&mut self.store.data_mut().callouts)
    }
}
