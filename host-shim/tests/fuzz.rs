//! host-shim's reader of the header maps a guest writes into its memory (untrusted: any
//! module may write anything) under mutated input (see `testkit::fuzz`): a map is read or
//! refused, never a panic, and what was read writes back to a map that reads the same.

use host_shim::abi::{decode_header_map, encode_header_map};
use testkit::fuzz::fuzz;

#[test]
fn fuzz_guest_header_maps() {
    let pairs = vec![
        (":method".to_string(), b"GET".to_vec()),
        ("x-empty".to_string(), Vec::new()),
        ("x-bin".to_string(), vec![0xff, 0, 1]),
    ];
    let map = encode_header_map(&pairs);
    fuzz(
        "guest header maps",
        &[&map, &encode_header_map(&[])],
        |case| {
            if let Some(list) = decode_header_map(case) {
                let again = decode_header_map(&encode_header_map(&list));
                assert_eq!(again.as_ref(), Some(&list));
            }
        },
    );
}
