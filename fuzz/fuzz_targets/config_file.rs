//! /etc/apiban/config.toml as an operator may write it: it resolves into a configuration or
//! an error that names the key; never a panic.
#![no_main]

use apiban::config::{RunArgs, parse_file, resolve};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(file) = parse_file(text) else {
        return;
    };
    let args = RunArgs {
        ifaces: vec!["eth0".into()],
        ..Default::default()
    };
    let _ = resolve(&args, None, file.clone());
    let _ = resolve(&RunArgs::default(), None, file);
});
