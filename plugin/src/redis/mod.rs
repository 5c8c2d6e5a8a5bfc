//! Talking to Redis: the command layer every feature shares ([`client`]: calls owned by a
//! request, a flush or a job, deadlines, EVALSHA with EVAL on NOSCRIPT), RESP on the wire
//! ([`resp`]), the error type with the server-error kind read once ([`error`]), the per-VM
//! circuit breaker ([`breaker`]) and every Lua script the filter runs ([`scripts`]).

pub mod breaker;
pub mod client;
pub mod error;
pub mod resp;
pub mod scripts;
