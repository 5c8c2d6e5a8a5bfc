//! WASI preview 1 from wasmtime-wasi, as Envoy offers it to plugins: no preopened directories,
//! no inherited stdio; fd 1 goes to the log at info and fd 2 at error, line by line.

use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::AsyncWrite;
use wasmtime::Linker;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamResult};
use wasmtime_wasi::WasiCtxBuilder;

use crate::state::HostState;

pub fn add_to_linker(linker: &mut Linker<HostState>) -> anyhow::Result<()> {
    wasmtime_wasi::p1::add_to_linker_async(linker, |s: &mut HostState| &mut s.wasi)?;
    Ok(())
}

/// The WASI context of one VM: log-backed stdout/stderr and the given environment.
pub fn wasi_context(plugin: &str, env: &[(String, String)]) -> WasiP1Ctx {
    let mut b = WasiCtxBuilder::new();
    b.stdout(LogStream::new(plugin, false))
        .stderr(LogStream::new(plugin, true))
        .envs(env);
    b.build_p1()
}

/// Bytes the guest writes, logged one line at a time.
#[derive(Clone)]
pub struct LogStream {
    plugin: Arc<str>,
    error: bool,
    pending: Arc<Mutex<Vec<u8>>>,
}

/// A line longer than this is logged in pieces rather than held without bound.
const MAX_LINE: usize = 16 * 1024;

impl LogStream {
    pub fn new(plugin: &str, error: bool) -> LogStream {
        LogStream {
            plugin: plugin.into(),
            error,
            pending: Arc::new(Mutex::new(Vec::new())),
        }
    }

    fn emit(&self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim_end_matches('\r');
        if self.error {
            tracing::error!(target: "wasm", plugin = &*self.plugin, "{text}");
        } else {
            tracing::info!(target: "wasm", plugin = &*self.plugin, "{text}");
        }
    }

    fn push(&self, bytes: &[u8]) {
        let mut pending = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        pending.extend_from_slice(bytes);
        while let Some(nl) = pending.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = pending.drain(..=nl).collect();
            self.emit(&line[..line.len() - 1]);
        }
        if pending.len() > MAX_LINE {
            let chunk = std::mem::take(&mut *pending);
            self.emit(&chunk);
        }
    }
}

impl IsTerminal for LogStream {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogStream {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LogStream {
    async fn ready(&mut self) {}
}

impl OutputStream for LogStream {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.push(&bytes);
        Ok(())
    }
    fn flush(&mut self) -> StreamResult<()> {
        Ok(())
    }
    fn check_write(&mut self) -> StreamResult<usize> {
        Ok(64 * 1024)
    }
}

impl AsyncWrite for LogStream {
    fn poll_write(
        self: Pin<&mut Self>,
        _: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.push(buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
