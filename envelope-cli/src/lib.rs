//! The library behind the `envelope` command. Its one public piece today is the Tencent-compatible
//! KMS emulator, so tests can start it in-process on a thread of its own.
#![forbid(unsafe_code)]

pub mod emulator;
