//! Builds the kernel programs (`programs/`) for the BPF target with the pinned nightly and
//! bpf-linker (see ../shared/design/TOOLCHAIN.md; `scripts/setup.sh` installs both).

fn main() {
    println!("cargo:rerun-if-env-changed=AYA_EBPF_TOOLCHAIN");
    let toolchain =
        std::env::var("AYA_EBPF_TOOLCHAIN").unwrap_or_else(|_| "nightly-2026-05-20".to_owned());
    let programs = concat!(env!("CARGO_MANIFEST_DIR"), "/programs");
    if let Err(e) = aya_build::build_ebpf(
        [aya_build::Package {
            name: "redirect-programs",
            root_dir: programs,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    ) {
        panic!(
            "building the eBPF programs failed: {e:#}\nthey need the {toolchain} toolchain with rust-src and bpf-linker 0.13 (llvm-22): run scripts/setup.sh"
        );
    }
}
