;; A plugin importing a host function host-shim does not provide: loading must fail and name it.
(module
  (import "env" "proxy_log" (func (param i32 i32 i32) (result i32)))
  (import "env" "proxy_does_not_exist" (func (param i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_1"))
  (func (export "proxy_on_context_create") (param i32 i32)))
