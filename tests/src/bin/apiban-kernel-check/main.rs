//! Does the production XDP program load and decide right on this kernel? `cargo xtask compat`
//! boots Debian 11's, 12's and 13's kernels under qemu with this binary as /init; it also
//! runs on any host as root.
//!
//! It probes what the program needs of the kernel, loads the program with what the kernel
//! has (the verifier's word), runs the differential check (generated frames through
//! BPF_PROG_TEST_RUN, every verdict compared with the model), then, where the kernel has
//! them, a capture through the ring buffer and SIP scanner detection's two halves (a request
//! sampled by the XDP program, the server's answer reported by the egress classifier), and
//! where it has not, checks that nothing is copied. With the agent in its initramfs it then
//! starts it (`agent.rs`). It prints one line `apiban-kernel-check: PASS ...` or
//! `apiban-kernel-check: FAIL ...`. As PID 1 it mounts what it needs first and powers the
//! machine off at the end.

mod agent;

use std::{path::Path, time::Instant};

use apiban::{
    dataplane::{
        capture::CaptureTap,
        detect::DetectTap,
        kernel::{self, Feature, KernelFeatures},
    },
    detect::sample::Sample,
};
use apiban_common::{
    CaptureConfig, DataplaneConfig, DetectConfig, Verdict, capture, detect, program_names,
};
use aya::programs::{SchedClassifier, TestRun as _, TestRunOptions};
use tests::{
    differential,
    frame::{Frame, PROTO_UDP, udp},
    reference::Policy,
    run_frame,
};

const FRAMES: usize = 20_000;
const SEED: u64 = 0x00a9_1ba2;

fn main() {
    let init = std::process::id() == 1;
    if init {
        mount_basics();
    }
    let outcome = check();
    match &outcome {
        Ok(summary) => println!(
            "apiban-kernel-check: PASS on {}: {summary}",
            kernel::release()
        ),
        Err(why) => println!("apiban-kernel-check: FAIL on {}: {why}", kernel::release()),
    }
    if init {
        // SAFETY: sync and reboot take no pointers; as PID 1 there is nothing else to stop.
        unsafe {
            libc::sync();
            libc::reboot(libc::RB_POWER_OFF);
        }
    }
    std::process::exit(i32::from(outcome.is_err()));
}

/// The glibc this process (and the agent it starts, from the same /lib) runs with: the
/// guest's userland, which the compat check compares with the one it packed.
fn glibc_version() -> String {
    // SAFETY: gnu_get_libc_version returns a static NUL-terminated string.
    unsafe { std::ffi::CStr::from_ptr(libc::gnu_get_libc_version()) }
        .to_string_lossy()
        .into_owned()
}

/// /proc, /sys, bpffs: what the loader and the probes read.
fn mount_basics() {
    for (source, target, fstype) in [
        ("proc", "/proc", "proc"),
        ("sysfs", "/sys", "sysfs"),
        ("bpf", "/sys/fs/bpf", "bpf"),
        ("devtmpfs", "/dev", "devtmpfs"),
    ] {
        let _ = std::fs::create_dir_all(target);
        let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
        let (source, target_c, fstype) = (c(source), c(target), c(fstype));
        // SAFETY: valid NUL-terminated strings; no data argument.
        let rc = unsafe {
            libc::mount(
                source.as_ptr(),
                target_c.as_ptr(),
                fstype.as_ptr(),
                0,
                std::ptr::null(),
            )
        };
        if rc != 0 {
            println!(
                "apiban-kernel-check: cannot mount {target}: {}",
                std::io::Error::last_os_error()
            );
        }
    }
}

fn check() -> Result<String, String> {
    println!(
        "apiban-kernel-check: kernel {}, BTF {}, C library glibc {}",
        kernel::release(),
        if Path::new("/sys/kernel/btf/vmlinux").exists() {
            "present"
        } else {
            "absent"
        },
        glibc_version()
    );
    for r in kernel::REQUIREMENTS {
        let state = match r.present() {
            Some(true) => "yes",
            Some(false) => "MISSING",
            None => "unknown (the probe failed)",
        };
        println!("apiban-kernel-check: {r}: {state}");
    }
    let features = KernelFeatures::probe();
    for f in features.report() {
        match &f.why_off {
            None => println!("apiban-kernel-check: feature {}: on", f.feature),
            Some(why) => println!("apiban-kernel-check: feature {}: off: {why}", f.feature),
        }
    }
    if !features.has(Feature::Enforcement) {
        return Err(kernel::describe_missing(&features));
    }
    let start = Instant::now();
    let agreement = std::panic::catch_unwind(|| differential::run(FRAMES, SEED))
        .map_err(|_| "the differential check panicked (see above)".to_owned())??;
    if let Some(v) = Verdict::ALL
        .into_iter()
        .find(|v| agreement.seen[*v as usize] == 0)
    {
        return Err(format!("no {} frame was generated", v.name()));
    }
    let differential_took = start.elapsed();
    let on = features.has(Feature::Capture);
    let captured = std::panic::catch_unwind(|| capture_one(on))
        .map_err(|_| "the capture check panicked (see above)".to_owned())??;
    let captured = match captured {
        Some(len) => format!("a dropped frame captured whole ({len} bytes)"),
        None => "capture off and nothing captured".to_owned(),
    };
    let on = features.has(Feature::Detection);
    std::panic::catch_unwind(|| detect_one(on))
        .map_err(|_| "the detection check panicked (see above)".to_owned())??;
    let detected = if on {
        "a REGISTER sampled and its 401 reported on egress"
    } else {
        "detection off and nothing sampled"
    };
    let agent = if Path::new(agent::AGENT).exists() {
        format!("; {}", agent::check(&features)?)
    } else {
        String::new()
    };
    Ok(format!(
        "{FRAMES} frames agreed with the model in {:.1}s (verdicts {:?}); {captured}; \
         {detected}{agent}",
        differential_took.as_secs_f64(),
        agreement.seen
    ))
}

/// The capture path: a banned source's frame, dropped, arrives in the ring buffer whole; on
/// a kernel without capture (`on` false), the program, asked to, copies nothing.
fn capture_one(on: bool) -> Result<Option<usize>, String> {
    let policy = Policy {
        deny: differential::nets(&["203.0.113.7/32"]),
        ..Default::default()
    };
    let mut under = differential::Under::new(&policy);
    let mut tap = CaptureTap::take(under.loaded.ebpf_mut()).map_err(|e| e.to_string())?;
    tap.controls
        .set(CaptureConfig {
            verdicts: 1 << Verdict::Dropped as u32,
            snaplen: capture::SNAPLEN as u32,
            per_sec: 10,
            _pad: 0,
        })
        .map_err(|e| e.to_string())?;
    under
        .loaded
        .dataplane
        .set_flag(DataplaneConfig::CAPTURE, true)
        .map_err(|e| e.to_string())?;
    let sent = Frame::udp(
        "203.0.113.7".parse().expect("literal"),
        "192.0.2.1".parse().expect("literal"),
        5060,
    )
    .build();
    let action = run_frame(&mut under.loaded, &sent);
    if action != differential::XDP_DROP {
        return Err(format!(
            "the banned frame got action {action}, not XDP_DROP"
        ));
    }
    if !on {
        return match tap.ring.next() {
            Some(_) => Err("capture is off on this kernel, yet a record arrived".into()),
            None => Ok(None),
        };
    }
    let record = tap
        .ring
        .next()
        .ok_or("nothing arrived in the capture ring buffer")?;
    let (record, len) = apiban::capture::decode_record(&record).ok_or("a short record")?;
    if record.data[..len] != sent[..] || record.verdict != Verdict::Dropped as u32 {
        return Err(format!(
            "the captured record differs: verdict {}, {len} of {} bytes",
            record.verdict,
            sent.len()
        ));
    }
    Ok(Some(len))
}

/// Detection: a REGISTER from a new source is sampled by the XDP program, and the server's
/// 401 to it is reported by the egress classifier; on a kernel without detection (`on`
/// false), switched on all the same, the program samples nothing and passes the REGISTER.
fn detect_one(on: bool) -> Result<(), String> {
    let mut under = differential::Under::new(&Policy::default());
    let mut tap = DetectTap::take(under.loaded.ebpf_mut()).map_err(|e| e.to_string())?;
    let config = DetectConfig {
        enabled: 1,
        first_samples: 2,
        sample_every: 8,
        samples_per_sec: 100,
        reports_per_sec: 100,
        rate_thresholds: [100; detect::METHODS],
        responses_per_sec: 100,
        window_ns: 10_000_000_000,
        hash_seed: 0x5eed,
    };
    tap.switches
        .set(config, &[5060], &[5061])
        .map_err(|e| e.to_string())?;
    let (client, server) = ("198.51.100.44", "192.0.2.1");
    let ip = |s: &str| s.parse().expect("literal");
    let register = Frame::ip(
        ip(client),
        ip(server),
        PROTO_UDP,
        udp(
            40000,
            5060,
            b"REGISTER sip:192.0.2.1 SIP/2.0\r\nCall-ID: k\r\n\r\n",
        ),
    )
    .build();
    let action = run_frame(&mut under.loaded, &register);
    if action != differential::XDP_PASS {
        return Err(format!(
            "a clean REGISTER got action {action}, not XDP_PASS"
        ));
    }
    if !on {
        return match tap.samples.next() {
            Some(_) => Err("detection is off on this kernel, yet a sample arrived".into()),
            None => Ok(()),
        };
    }
    let answer = Frame::ip(
        ip(server),
        ip(client),
        PROTO_UDP,
        udp(
            5060,
            40000,
            b"SIP/2.0 401 Unauthorized\r\nCall-ID: k\r\n\r\n",
        ),
    )
    .build();
    let egress: &mut SchedClassifier = under
        .loaded
        .ebpf_mut()
        .program_mut(program_names::EGRESS)
        .ok_or("no egress classifier in the object")?
        .try_into()
        .map_err(|e| format!("the egress program: {e}"))?;
    egress
        .load()
        .map_err(|e| format!("the verifier refuses the egress classifier: {e}"))?;
    let mut opts = TestRunOptions::new();
    opts.data_in = Some(&answer);
    egress
        .test_run(opts)
        .map_err(|e| format!("BPF_PROG_TEST_RUN of the egress classifier: {e}"))?;
    let mut kinds = Vec::new();
    while let Some(item) = tap.samples.next() {
        let sample = Sample::decode(&item).ok_or("a short detection record")?;
        if sample.addr != ip(client) {
            return Err(format!("a record for {}, not {client}", sample.addr));
        }
        kinds.push(sample.kind);
    }
    if kinds != [detect::KIND_SAMPLE, detect::KIND_RESPONSE] {
        return Err(format!(
            "detection's records were of kinds {kinds:?}, not a sample then a response"
        ));
    }
    Ok(())
}
