//! Hand-written WAT guests (`tests/wat/`) for what an SDK guest cannot express: imports the host
//! lacks or declares differently, a module that is not a proxy-wasm plugin, and the header-map
//! byte layout checked byte by byte in both directions.

mod abi_support;

use abi_support::{header, request, try_start_module, wat_source, GatewayOptions};
use host_shim::vm::{PluginModule, VmError};

/// The ABI's header-map layout: u32 count, (key_len, value_len) per pair, then each key and
/// value followed by a NUL; all integers little-endian.
fn encode(pairs: &[(&str, &str)]) -> Vec<u8> {
    let mut out = (pairs.len() as u32).to_le_bytes().to_vec();
    for (k, v) in pairs {
        out.extend((k.len() as u32).to_le_bytes());
        out.extend((v.len() as u32).to_le_bytes());
    }
    for (k, v) in pairs {
        out.extend(k.as_bytes());
        out.push(0);
        out.extend(v.as_bytes());
        out.push(0);
    }
    out
}

/// Decodes the layout strictly: every size in bounds, a NUL after every key and value, and no
/// byte left over.
fn decode_strict(bytes: &[u8]) -> Vec<(String, String)> {
    let u32_at = |at: usize| -> usize {
        let b: [u8; 4] = bytes
            .get(at..at + 4)
            .and_then(|s| s.try_into().ok())
            .unwrap_or_else(|| panic!("no u32 at {at} in {} bytes", bytes.len()));
        u32::from_le_bytes(b) as usize
    };
    let count = u32_at(0);
    let mut pos = 4 + 8 * count;
    let mut out = Vec::new();
    for i in 0..count {
        let (k, v) = (u32_at(4 + 8 * i), u32_at(8 + 8 * i));
        let mut field = |len: usize| -> String {
            let text = bytes
                .get(pos..pos + len)
                .unwrap_or_else(|| panic!("pair {i} runs past the end"));
            assert_eq!(
                bytes.get(pos + len),
                Some(&0),
                "pair {i}: no NUL after {len} bytes at {pos}"
            );
            pos += len + 1;
            String::from_utf8_lossy(text).into_owned()
        };
        let key = field(k);
        let value = field(v);
        out.push((key, value));
    }
    assert_eq!(pos, bytes.len(), "bytes left over after {count} pairs");
    out
}

/// Splits the WAT guest's report: five u32 statuses, then three length-prefixed byte strings.
fn report(body: &[u8]) -> ([u32; 5], Vec<Vec<u8>>) {
    let u32_at = |at: usize| -> u32 {
        u32::from_le_bytes(
            body.get(at..at + 4)
                .and_then(|s| s.try_into().ok())
                .unwrap_or_else(|| panic!("short report: {body:?}")),
        )
    };
    let statuses = [u32_at(0), u32_at(4), u32_at(8), u32_at(12), u32_at(16)];
    let mut pos = 20;
    let mut parts = Vec::new();
    for _ in 0..3 {
        let len = u32_at(pos) as usize;
        parts.push(
            body.get(pos + 4..pos + 4 + len)
                .unwrap_or_else(|| panic!("short report: {body:?}"))
                .to_vec(),
        );
        pos += 4 + len;
    }
    assert_eq!(pos, body.len(), "report has trailing bytes");
    (statuses, parts)
}

#[test]
fn header_map_pairs_use_the_abi_byte_layout_in_both_directions() {
    let (path, wat) = wat_source("header_map_bytes.wat");
    let module = PluginModule::from_bytes(&path, &wat).unwrap_or_else(|e| panic!("{e}"));
    let gw =
        try_start_module(module, "", &GatewayOptions::default()).unwrap_or_else(|e| panic!("{e}"));
    let (resp, _) = request(
        gw.addr,
        "GET",
        "/layout?q=1",
        &[("host", "wat.test"), ("x-wat-probe", "v"), ("x-empty", "")],
        b"",
    );
    assert_eq!(resp.status, 200, "{}", resp.text());
    let (statuses, parts) = report(&resp.body);
    // get, set, set(malformed), get, get value
    assert_eq!(
        statuses,
        [0, 0, 3, 0, 0],
        "statuses (3 = SerializationFailure for the malformed map)"
    );

    // What the host wrote: exactly the layout, re-encodable byte for byte.
    let read = decode_strict(&parts[0]);
    let as_refs: Vec<(&str, &str)> = read.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    assert_eq!(
        encode(&as_refs),
        parts[0],
        "the host's bytes are the canonical layout"
    );
    assert_eq!(
        &as_refs[..4],
        [
            (":authority", "wat.test"),
            (":path", "/layout?q=1"),
            (":method", "GET"),
            (":scheme", "http")
        ]
    );
    assert!(as_refs.contains(&("x-wat-probe", "v")), "{as_refs:?}");
    assert!(
        as_refs.contains(&("x-empty", "")),
        "an empty value is kept: {as_refs:?}"
    );

    // What the guest wrote by hand is read back unchanged; the malformed map changed nothing.
    let hand = [
        (":method", "GET"),
        (":path", "/from-wat"),
        ("x-wat-a", "1"),
        ("x-wat-b", ""),
    ];
    assert_eq!(parts[1], encode(&hand));
    assert_eq!(parts[2], b"1", "proxy_get_header_map_value");

    // The local response's headers were parsed from a hand-built map too.
    assert_eq!(header(&resp, "x-wat-resp"), "yes");
    assert_eq!(header(&resp, "x-wat-two"), "2");
}

#[test]
fn module_importing_a_function_the_host_lacks_is_refused_naming_the_import() {
    let (path, wat) = wat_source("missing_import.wat");
    match PluginModule::from_bytes(&path, &wat) {
        Ok(_) => panic!("a module importing env.proxy_does_not_exist loaded"),
        Err(e) => {
            assert!(matches!(e, VmError::Link { .. }), "{e:?}");
            let shown = e.to_string();
            assert!(shown.contains("env::proxy_does_not_exist"), "{shown}");
            assert!(
                shown.contains("missing_import.wat"),
                "names the plugin: {shown}"
            );
        }
    }
}

#[test]
fn module_importing_a_host_function_with_the_wrong_signature_is_refused_naming_it() {
    let (path, wat) = wat_source("wrong_signature_import.wat");
    match PluginModule::from_bytes(&path, &wat) {
        Ok(_) => panic!("a module importing proxy_log with the wrong signature loaded"),
        Err(e) => {
            let shown = e.to_string();
            assert!(shown.contains("proxy_log"), "{shown}");
        }
    }
}

#[test]
fn module_without_proxy_on_context_create_fails_to_start_clearly() {
    let (path, wat) = wat_source("no_context_create.wat");
    let module = PluginModule::from_bytes(&path, &wat).unwrap_or_else(|e| panic!("{e}"));
    match try_start_module(module, "", &GatewayOptions::default()) {
        Ok(_) => panic!("a module without proxy_on_context_create started"),
        Err(e) => {
            assert!(matches!(e, VmError::Start(_)), "{e:?}");
            assert!(e.to_string().contains("proxy_on_context_create"), "{e}");
        }
    }
}

#[test]
fn text_that_is_not_wasm_is_refused_as_a_compile_error() {
    let path = std::path::Path::new("not-a-plugin.wasm");
    match PluginModule::from_bytes(path, b"this is not wasm") {
        Ok(_) => panic!("garbage compiled"),
        Err(e) => {
            assert!(matches!(e, VmError::Compile { .. }), "{e:?}");
            assert!(e.to_string().contains("not-a-plugin.wasm"), "{e}");
        }
    }
}

/// header_map_bytes.wat with its allocator exported under `export` (None: not exported).
fn start_with_allocator(export: Option<&str>) -> abi_support::TestGateway {
    let (path, wat) = wat_source("header_map_bytes.wat");
    let text = String::from_utf8(wat).expect("utf-8 wat");
    let from = r#"(func $malloc (export "malloc")"#;
    assert!(text.contains(from), "the wat changed: {from} not found");
    let to = match export {
        Some(name) => format!(r#"(func $malloc (export "{name}")"#),
        None => "(func $malloc".to_string(),
    };
    let module = PluginModule::from_bytes(&path, text.replace(from, &to).as_bytes())
        .unwrap_or_else(|e| panic!("{e}"));
    try_start_module(module, "", &GatewayOptions::default()).unwrap_or_else(|e| panic!("{e}"))
}

/// The host hands data to the guest through `malloc`, else `proxy_on_memory_allocate` (found
/// once per VM); without either, calls that return data fail with InternalFailure (10), and the
/// plugin goes on (no trap).
#[test]
fn returned_bytes_use_either_allocator_and_none_is_an_internal_failure() {
    let gw = start_with_allocator(Some("proxy_on_memory_allocate"));
    let (resp, _) = request(gw.addr, "GET", "/alloc", &[("x-wat-probe", "v")], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let (statuses, parts) = report(&resp.body);
    assert_eq!(statuses, [0, 0, 3, 0, 0]);
    assert!(decode_strict(&parts[0])
        .iter()
        .any(|(k, v)| k == "x-wat-probe" && v == "v"));
    assert_eq!(parts[2], b"1", "x-wat-a's value");

    let gw = start_with_allocator(None);
    let (resp, _) = request(gw.addr, "GET", "/alloc", &[], b"");
    assert_eq!(resp.status, 200, "{}", resp.text());
    let (statuses, parts) = report(&resp.body);
    assert_eq!(
        statuses,
        [10, 0, 3, 10, 10],
        "gets fail, sets do not need it"
    );
    assert!(parts.iter().all(Vec::is_empty), "{parts:?}");
}

/// Envoy 1.40 refuses such a module at load: "Missing or unknown Proxy-Wasm ABI version".
#[test]
fn module_without_an_abi_version_export_is_refused_at_load_naming_the_export() {
    let (path, wat) = wat_source("no_abi_version.wat");
    match PluginModule::from_bytes(&path, &wat) {
        Ok(_) => panic!("a module without proxy_abi_version_* loaded"),
        Err(e) => {
            assert!(matches!(e, VmError::AbiVersion { .. }), "{e:?}");
            let text = e.to_string();
            assert!(text.contains("proxy_abi_version_0_2_1"), "{text}");
            assert!(text.contains("found: none"), "{text}");
        }
    }
}

/// Envoy loads ABI 0.1.0 modules with 0.1.0's callbacks; host-shim runs 0.2.x only and says so
/// instead of calling 0.1.0 callbacks with 0.2.1 arguments.
#[test]
fn module_of_abi_0_1_0_is_refused_as_unsupported() {
    let (path, wat) = wat_source("abi_version_0_1_0.wat");
    match PluginModule::from_bytes(&path, &wat) {
        Ok(_) => panic!("an ABI 0.1.0 module loaded"),
        Err(e) => assert!(e.to_string().contains("ABI 0.1.0"), "{e}"),
    }
}

/// Envoy 1.40 accepts `proxy_abi_version_0_2_0` with the same imports as 0.2.1.
#[test]
fn module_of_abi_0_2_0_loads() {
    let (path, wat) = wat_source("abi_version_0_2_0.wat");
    PluginModule::from_bytes(&path, &wat).unwrap_or_else(|e| panic!("{e}"));
}
