;; A module declaring ABI 0.2.0, which Envoy 1.40 accepts with the same imports as 0.2.1.
(module
  (memory (export "memory") 1)
  (func (export "proxy_abi_version_0_2_0"))
  (func (export "proxy_on_context_create") (param i32 i32)))
