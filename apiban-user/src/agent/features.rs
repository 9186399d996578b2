//! The kernel's features as the agent uses them: probed once, each said once at start (on, or
//! off and why), fitted into the configuration at start and on every reload. A feature the
//! operator asked for (`--detect`, `detect` in the config file) and the kernel cannot run is
//! an error that names the kernel it needs; one only the defaults would have used is off,
//! and said so. Never a silent no-op.

use std::sync::OnceLock;

use crate::{
    config::ConfigError,
    dataplane::kernel::{Feature, KernelFeatures},
    detect::{DetectMode, DetectSettings},
};

static KERNEL: OnceLock<KernelFeatures> = OnceLock::new();

/// This kernel's features, probed on the first call (the kernel does not change under a
/// running agent).
pub fn probe() -> &'static KernelFeatures {
    KERNEL.get_or_init(KernelFeatures::probe)
}

/// The probe's result, if this agent runs a dataplane (None in a dry run).
pub fn probed() -> Option<&'static KernelFeatures> {
    KERNEL.get()
}

/// One line per feature, at start.
pub fn announce(k: &KernelFeatures) {
    for state in k.report() {
        match &state.why_off {
            None => tracing::info!(
                feature = %state.feature,
                kernel = %k.release,
                "kernel feature on"
            ),
            Some(why) => tracing::warn!(
                feature = %state.feature,
                kernel = %k.release,
                "kernel feature off: {why}"
            ),
        }
    }
}

/// Fits detection to what the kernel can do: asked for by the operator on a kernel without
/// it, refused; turned on only by the defaults, turned off.
pub fn fit(detect: &mut DetectSettings, k: &KernelFeatures) -> Result<(), ConfigError> {
    if detect.mode == DetectMode::Off {
        return Ok(());
    }
    let Some(why) = k.why_off(Feature::Detection) else {
        return Ok(());
    };
    if detect.mode_set {
        return Err(ConfigError::Invalid {
            key: "detect",
            message: format!(
                "--detect {} asks for SIP scanner detection, which {why}; set it to off, or run on \
                 Linux {} or newer",
                detect.mode.name(),
                KernelFeatures::needs_linux(Feature::Detection)
            ),
        });
    }
    detect.mode = DetectMode::Off;
    Ok(())
}

/// Why `apiban capture` cannot run on this kernel; None when it can.
pub fn capture_off(k: &KernelFeatures) -> Option<String> {
    k.why_off(Feature::Capture)
        .map(|why| format!("capturing packets {why}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dataplane::kernel::REQUIREMENTS;

    fn on_5_10() -> KernelFeatures {
        KernelFeatures::with_missing(
            "5.10.0-33-amd64".into(),
            REQUIREMENTS
                .into_iter()
                .filter(|r| r.since == "5.18" || r.since == "6.6")
                .collect(),
        )
    }

    fn settings(mode: DetectMode, set: bool) -> DetectSettings {
        DetectSettings {
            mode,
            mode_set: set,
            ..DetectSettings::default()
        }
    }

    #[test]
    fn detection_asked_for_on_5_10_is_an_error_naming_the_kernel_it_needs() {
        let mut c = settings(DetectMode::Enforce, true);
        let err = fit(&mut c, &on_5_10()).expect_err("refused").to_string();
        assert!(err.contains("needs Linux 5.18 or newer"), "{err}");
        assert!(err.contains("5.10.0-33-amd64"), "{err}");
        assert!(err.contains("bpf_xdp_load_bytes"), "{err}");
    }

    #[test]
    fn detection_only_the_defaults_asked_for_is_turned_off() {
        let mut c = settings(DetectMode::Observe, false);
        fit(&mut c, &on_5_10()).expect("fitted");
        assert_eq!(c.mode, DetectMode::Off);
        let mut off = settings(DetectMode::Off, true);
        fit(&mut off, &on_5_10()).expect("off is always possible");
    }

    #[test]
    fn a_kernel_with_detection_keeps_the_mode() {
        let mut c = settings(DetectMode::Enforce, true);
        fit(
            &mut c,
            &KernelFeatures::with_missing("6.1.0".into(), Vec::new()),
        )
        .expect("fits");
        assert_eq!(c.mode, DetectMode::Enforce);
    }
}
