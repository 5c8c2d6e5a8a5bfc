# The filter for stock Envoy as a Wasm OCI image, for Istio's WasmPlugin and Envoy Gateway's
# EnvoyExtensionPolicy: a final stage FROM scratch with exactly one COPY, so the image has one
# layer holding plugin.wasm (the layout both pull; Envoy Gateway's "Build a Wasm image").
# Build context: the repository root.
#   docker build -f envoy/kubernetes/plugin.Dockerfile -t REGISTRY/krowoc-edge-envoy:0.1.0 .
#   docker push REGISTRY/krowoc-edge-envoy:0.1.0
#
# Unlike envoy/higress/plugin.Dockerfile this builds --no-default-features: Istio's and Envoy
# Gateway's proxies are Envoy, which refuses a module importing Higress's proxy_redis_init and
# proxy_redis_call. It is envoy/docker/envoy.Dockerfile's build, so it shares that target cache.
FROM rust:1.95.0-bookworm AS plugin
RUN rustup target add wasm32-wasip1
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY plugin plugin
COPY host-shim host-shim
COPY upstream upstream
COPY testkit testkit
COPY tests tests
COPY relay relay
COPY xtask xtask
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target,id=krowoc-cargo-target \
    cargo build --locked -p krowoc-plugin --target wasm32-wasip1 --profile wasm --no-default-features \
    && install -D -m 0644 target/wasm32-wasip1/wasm/krowoc_plugin.wasm /out/plugin.wasm

FROM scratch
COPY --from=plugin /out/plugin.wasm /plugin.wasm
