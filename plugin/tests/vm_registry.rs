//! `vm_registry.lua` against a real redis-server: VMs that decide requests register, others
//! take themselves out, and registrations lapse on their own.

use krowoc_plugin::redis::scripts::VM_REGISTRY_LUA;
use std::time::Duration;
use testkit::RedisServer;

const KEY: &str = "krowoc:vms";

fn register(redis: &RedisServer, member: &str, ttl_ms: u64, deciding: bool) -> i64 {
    let ttl = ttl_ms.to_string();
    let flag = if deciding { "1" } else { "0" };
    redis.int(&["EVAL", VM_REGISTRY_LUA, "1", KEY, member, &ttl, flag])
}

#[test]
fn deciding_vms_are_counted_until_they_stop_or_lapse() {
    let redis = RedisServer::start();
    assert_eq!(register(&redis, "a", 60_000, true), 1);
    assert_eq!(register(&redis, "b", 60_000, true), 2);
    assert_eq!(register(&redis, "a", 60_000, true), 2, "once per VM");
    assert_eq!(
        register(&redis, "c", 60_000, false),
        2,
        "an idle VM reads the count without joining it"
    );
    assert_eq!(
        register(&redis, "a", 60_000, false),
        1,
        "a VM that stopped deciding leaves"
    );
    let pttl = redis.int(&["PTTL", KEY]);
    assert!(
        (1..=60_000).contains(&pttl),
        "the registry itself expires: {pttl}"
    );

    assert_eq!(register(&redis, "d", 300, true), 2);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        register(&redis, "c", 60_000, false),
        1,
        "d's registration lapsed without d"
    );
}
