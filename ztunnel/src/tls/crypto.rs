//! Which crypto implementation carries TLS: chosen at start-up from what the CPU has.
//!
//! Measured with `cargo bench -p ztunnel --bench crypto_providers` (in-memory TLS 1.3 bulk
//! transfer, AES-128-GCM, one core):
//!
//! | CPU | ring | aws-lc-rs |
//! |---|---|---|
//! | AMD EPYC with VAES, VPCLMULQDQ and AVX-512 (these machines since 2026-12) | 30.5 Gbit/s | **49.0** |
//! | Intel with VAES and AVX-512 | 26.7 | **30.7** |
//! | AMD EPYC of the earlier runs (no VAES) | **13.3** | 8.8 |
//!
//! aws-lc-rs is faster where its AES-GCM can use the wide vector AES instructions
//! (VAES with VPCLMULQDQ and AVX-512), ring where it cannot. `auto` follows that rule; the
//! choice and the features it saw are logged at start-up.

use std::fmt;

use rustls::crypto::CryptoProvider;

/// A crypto implementation for rustls, or the rule that picks one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CryptoChoice {
    /// aws-lc-rs where the CPU has VAES, VPCLMULQDQ and AVX-512; ring elsewhere.
    Auto,
    Ring,
    #[value(name = "aws-lc-rs")]
    AwsLcRs,
}

/// The implementation in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CryptoBackend {
    Ring,
    AwsLcRs,
}

impl fmt::Display for CryptoBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CryptoBackend::Ring => "ring",
            CryptoBackend::AwsLcRs => "aws-lc-rs",
        })
    }
}

/// The CPU features the choice depends on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuFeatures {
    pub aes: bool,
    pub vaes: bool,
    pub vpclmulqdq: bool,
    pub avx512f: bool,
    pub avx512vl: bool,
}

impl CpuFeatures {
    /// This CPU's.
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            CpuFeatures {
                aes: std::arch::is_x86_feature_detected!("aes"),
                vaes: std::arch::is_x86_feature_detected!("vaes"),
                vpclmulqdq: std::arch::is_x86_feature_detected!("vpclmulqdq"),
                avx512f: std::arch::is_x86_feature_detected!("avx512f"),
                avx512vl: std::arch::is_x86_feature_detected!("avx512vl"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuFeatures::default()
        }
    }

    fn wide_vector_aes(&self) -> bool {
        self.aes && self.vaes && self.vpclmulqdq && self.avx512f && self.avx512vl
    }

    /// The features present, for the start-up log line.
    pub fn names(&self) -> String {
        let named = [
            ("aes", self.aes),
            ("vaes", self.vaes),
            ("vpclmulqdq", self.vpclmulqdq),
            ("avx512f", self.avx512f),
            ("avx512vl", self.avx512vl),
        ];
        let present: Vec<&str> = named.iter().filter(|(_, p)| *p).map(|(n, _)| *n).collect();
        if present.is_empty() {
            "none of aes, vaes, vpclmulqdq, avx512f, avx512vl".to_owned()
        } else {
            present.join(" ")
        }
    }
}

/// The implementation `choice` means on a CPU with `features`, and why.
pub fn choose(choice: CryptoChoice, features: &CpuFeatures) -> (CryptoBackend, &'static str) {
    match choice {
        CryptoChoice::Ring => (CryptoBackend::Ring, "asked for (--crypto ring)"),
        CryptoChoice::AwsLcRs => (CryptoBackend::AwsLcRs, "asked for (--crypto aws-lc-rs)"),
        CryptoChoice::Auto if features.wide_vector_aes() => (
            CryptoBackend::AwsLcRs,
            "the CPU has VAES, VPCLMULQDQ and AVX-512, where aws-lc-rs's AES-GCM is the faster",
        ),
        CryptoChoice::Auto => (
            CryptoBackend::Ring,
            "the CPU lacks VAES, VPCLMULQDQ or AVX-512, where ring's AES-GCM is the faster",
        ),
    }
}

/// The rustls provider of `backend`, with AES-128-GCM first (TLS 1.3's cheapest suite on CPUs
/// with AES instructions; the peer's order of preference decides among what both offer).
pub fn provider(backend: CryptoBackend) -> CryptoProvider {
    let mut provider = match backend {
        CryptoBackend::Ring => rustls::crypto::ring::default_provider(),
        CryptoBackend::AwsLcRs => rustls::crypto::aws_lc_rs::default_provider(),
    };
    provider
        .cipher_suites
        .sort_by_key(|suite| match suite.suite() {
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 => 0,
            rustls::CipherSuite::TLS13_AES_256_GCM_SHA384 => 1,
            _ => 2,
        });
    provider
}

#[cfg(test)]
mod tests {
    use super::*;

    const WIDE: CpuFeatures = CpuFeatures {
        aes: true,
        vaes: true,
        vpclmulqdq: true,
        avx512f: true,
        avx512vl: true,
    };

    #[test]
    fn auto_takes_aws_lc_rs_only_with_wide_vector_aes() {
        assert_eq!(choose(CryptoChoice::Auto, &WIDE).0, CryptoBackend::AwsLcRs);
        for missing in 0..5 {
            let mut f = WIDE;
            match missing {
                0 => f.aes = false,
                1 => f.vaes = false,
                2 => f.vpclmulqdq = false,
                3 => f.avx512f = false,
                _ => f.avx512vl = false,
            }
            assert_eq!(
                choose(CryptoChoice::Auto, &f).0,
                CryptoBackend::Ring,
                "{f:?}"
            );
        }
    }

    #[test]
    fn an_explicit_choice_wins_over_the_cpu() {
        assert_eq!(choose(CryptoChoice::Ring, &WIDE).0, CryptoBackend::Ring);
        assert_eq!(
            choose(CryptoChoice::AwsLcRs, &CpuFeatures::default()).0,
            CryptoBackend::AwsLcRs
        );
    }

    #[test]
    fn both_providers_prefer_aes_128_gcm_and_keep_every_suite() {
        for (backend, all) in [
            (
                CryptoBackend::Ring,
                rustls::crypto::ring::default_provider(),
            ),
            (
                CryptoBackend::AwsLcRs,
                rustls::crypto::aws_lc_rs::default_provider(),
            ),
        ] {
            let p = provider(backend);
            assert_eq!(
                p.cipher_suites[0].suite(),
                rustls::CipherSuite::TLS13_AES_128_GCM_SHA256,
                "{backend}"
            );
            assert_eq!(p.cipher_suites.len(), all.cipher_suites.len(), "{backend}");
        }
    }

    #[test]
    fn feature_names_list_what_is_present() {
        assert_eq!(WIDE.names(), "aes vaes vpclmulqdq avx512f avx512vl");
        assert!(CpuFeatures::default().names().starts_with("none of"));
    }
}
