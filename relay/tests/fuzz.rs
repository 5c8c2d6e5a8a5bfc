//! The relay's parser of request bodies (untrusted: whatever reaches its port with a token)
//! under mutated input (see `testkit::fuzz`): every body is split into commands or refused
//! with an error that says where, never a panic.

use krowoc_relay::pool::parse_commands;
use testkit::fuzz::fuzz;

#[test]
fn fuzz_request_bodies() {
    let seeds: [&[u8]; 4] = [
        b"*1\r\n$4\r\nPING\r\n",
        b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$5\r\nhello\r\n*2\r\n$3\r\nGET\r\n$1\r\nk\r\n",
        b"*5\r\n$7\r\nEVALSHA\r\n$40\r\n0123456789012345678901234567890123456789\r\n$1\r\n1\r\n$3\r\nk:1\r\n$2\r\n10\r\n",
        b"",
    ];
    fuzz(
        "relay request bodies",
        &seeds,
        |case| match parse_commands(case) {
            Ok(commands) => {
                // Each command takes at least "*1\r\n$1\r\nX\r\n" (11 bytes).
                assert!(commands.len() <= case.len() / 11, "{}", commands.len());
            }
            Err(e) => assert!(!e.to_string().is_empty()),
        },
    );
}
