//! The release link's code layout (`link/order.rs`, used by `build.rs`): the linker script made
//! from `link/weft.order` keeps placing the listed functions first, in the listed order, after
//! the hashes in their names changed.
//!
//! The real check links a small program twice with rustc's own linker (rust-lld on x86_64
//! Linux): once to take its symbol names, as `scripts/text-order` takes them from a profile,
//! and once with another crate hash (`-C metadata`, what a dependency update or another profile
//! changes) and the script made from the first names.

#[path = "../link/order.rs"]
mod order;

#[test]
fn patterns_leave_out_hashes_and_keep_the_order() {
    // One function from two builds: another crate disambiguator (one digit shorter), so the
    // back-reference after it points one byte earlier.
    let a = "_RINvNtCsjrHSEGnQ3l9_3std2io19default_read_to_endRNtNtB4_2fs4FileEB4_";
    let b = "_RINvNtCsjrHSEGnQ3l_3std2io19default_read_to_endRNtNtB3_2fs4FileEB3_";
    let other = "_RINvNtCsjrHSEGnQ3l9_3std2io19default_read_to_endRNtNtB4_3net9TcpStreamEB4_";
    let legacy = "_ZN4http6header4name14StandardHeader6as_str17hc81257a8edb56e20E.4286";
    let c = "extent_split_interior.constprop.0";
    // Instantiated in one crate in one build and in another in the next; and a function whose
    // name ends in an identifier of its own.
    let here = "_RNvMs4_NtCslNYArtu3iFV_5alloc7raw_vecNtB5_11RawVecInner11finish_growCs1tYhZzdi5XL_10tower_http";
    let there =
        "_RNvMs4_NtCslNYArtu3iFV_5alloc7raw_vecNtB5_11RawVecInner11finish_growCsfaPb1dIVt1V_4weft";
    let own = "_RNvNtCsfaPb1dIVt1V_4weft5proxy10tower_http.77";
    // `B` and `_` inside identifiers, not a back-reference.
    let ident = "_RNvMsn_NtCslNYArtu3iFV_5alloc4syncINtB5_3ArcNtNtNtCsbuutW9uXvWt_17opentelemetry_sdk4logs6export8LogBatchE9drop_slowCsfaPb1dIVt1V_4weft";
    // The crypto libraries' names carry their version: the next release's folds into this one's.
    let ring = "ring_core_0_17_14__sha256_block_data_order_avx";
    let ring_next = "ring_core_0_17_15__sha256_block_data_order_avx";
    let aws = "aws_lc_0_47_0_EVP_AEAD_CTX_seal";
    let aws_next = "aws_lc_0_48_1_EVP_AEAD_CTX_seal";
    let order = format!(
        "{a}\n{legacy}\n\n{b}\n{c}\n{other}\n{here}\n{there}\n{own}\n{ident}\n{ring}\n{aws}\n\
         {ring_next}\n{aws_next}\n"
    );
    let script = order::script(&order).expect("script");
    let lines: Vec<&str> = script.lines().filter(|l| l.contains("*(")).collect();
    let want: Vec<String> = [
        "_RINvNtCs*_3std2io19default_read_to_endRNtNtB*_2fs4FileE*",
        "_ZN4http6header4name14StandardHeader6as_str17h*E.*",
        "extent_split_interior.constprop.*",
        "_RINvNtCs*_3std2io19default_read_to_endRNtNtB*_3net9TcpStreamE*",
        "_RNvMs4_NtCs*_5alloc7raw_vecNtB*_11RawVecInner11finish_grow*",
        "_RNvNtCs*_4weft5proxy10tower_http.*",
        "_RNvMsn_NtCs*_5alloc4syncINtB*_3ArcNtNtNtCs*_17opentelemetry_sdk4logs6export8LogBatchE9drop_slow*",
        "ring_core_*__sha256_block_data_order_avx",
        "aws_lc_*_EVP_AEAD_CTX_seal",
    ]
    .iter()
    .map(|p| format!("    *(.text.{p} .text.unlikely.{p} .text.startup.{p})"))
    .collect();
    assert_eq!(
        lines, want,
        "one pattern per function, in the file's order, the second build's name folded into \
         the first's, another instantiation kept apart, the instantiating crate left out:\n\
         {script}"
    );
    assert!(
        script.starts_with("SECTIONS\n{\n  .text.hot : {\n"),
        "{script}"
    );
    assert!(
        script.ends_with("  }\n}\nINSERT BEFORE .text;\n"),
        "{script}"
    );
}

#[test]
fn a_line_that_is_not_a_symbol_name_is_an_error_naming_it() {
    let good = "_RNvCsfaPb1dIVt1V_4weft4main";
    for bad in ["*", "foo)", "a b", "x[1]", "n?", "_ZN3foo{bar}"] {
        let err = order::script(&format!("{good}\n\n{bad}\n"))
            .expect_err(bad)
            .to_string();
        assert!(
            err.contains("line 3") && err.contains(&format!("{bad:?}")),
            "{bad}: {err}"
        );
    }
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
mod link {
    use super::order;
    use std::path::Path;
    use std::process::Command;

    const PROBE: &str = r#"
    #[inline(never)]
    pub fn cold_one(x: u64) -> u64 { x.wrapping_mul(3) ^ 7 }
    #[cold]
    #[inline(never)]
    pub fn hot_b(x: u64) -> u64 { x.rotate_left(5).wrapping_add(1) }
    #[inline(never)]
    pub fn hot_a(x: u64) -> u64 { x.rotate_right(3) ^ 11 }
    #[inline(never)]
    pub fn twice<T: Into<u64>>(x: T) -> u64 { x.into().wrapping_mul(2) }
    fn main() {
        let n = std::hint::black_box(std::env::args().count() as u64);
        println!("{}", cold_one(n) ^ hot_b(n) ^ hot_a(n) ^ twice(n as u8) ^ twice(n as u16));
    }
    "#;

    /// The probe's functions by address, from `nm`: (address, name).
    fn symbols(bin: &Path) -> Vec<(u64, String)> {
        let out = Command::new("nm")
            .args(["--defined-only"])
            .arg(bin)
            .output()
            .expect("nm (binutils)");
        assert!(out.status.success(), "nm: {out:?}");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut f = l.split_whitespace();
                let addr = u64::from_str_radix(f.next()?, 16).ok()?;
                let kind = f.next()?;
                let name = f.next()?;
                (kind.eq_ignore_ascii_case("t") && name.contains("12layout_probe"))
                    .then(|| (addr, name.to_string()))
            })
            .collect()
    }

    /// The probe's function whose v0 name contains `marker` (`5hot_a`; `5twicet`: `twice::<u16>`).
    fn find<'a>(syms: &'a [(u64, String)], marker: &str) -> &'a (u64, String) {
        let found: Vec<_> = syms.iter().filter(|(_, n)| n.contains(marker)).collect();
        assert_eq!(found.len(), 1, "{marker} in {syms:#?}");
        found[0]
    }

    fn rustc(dir: &Path, metadata: &str, out: &str, script: Option<&Path>) {
        let mut cmd = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into()));
        cmd.current_dir(dir)
            .args([
                "--edition",
                "2021",
                "--crate-name",
                "layout_probe",
                "-C",
                "opt-level=1",
            ])
            .args(["-C", "symbol-mangling-version=v0", "-C"])
            .arg(format!("metadata={metadata}"))
            .args(["-o", out, "probe.rs"]);
        if let Some(script) = script {
            cmd.arg("-C")
                .arg(format!("link-arg=-Wl,-T,{}", script.display()));
        }
        let status = cmd.status().expect("rustc");
        assert!(status.success(), "rustc {out}: {status}");
    }

    #[test]
    fn layout_survives_new_symbol_hashes() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("probe.rs"), PROBE).expect("write probe");

        // The profiled build: its names, in the order wanted (against the source's order).
        // `hot_b` is cold to the compiler (`#[cold]`: a section of another kind,
        // `.text.unlikely.`).
        rustc(dir.path(), "first", "first", None);
        let first = symbols(&dir.path().join("first"));
        let wanted = ["5hot_a", "5twicet", "5hot_b"];
        let names: Vec<&str> = wanted.iter().map(|m| find(&first, m).1.as_str()).collect();
        let script = dir.path().join("order.ld");
        std::fs::write(&script, order::script(&names.join("\n")).expect("script")).expect("write");

        // Another crate hash, linked with the script made from the first build's names.
        rustc(dir.path(), "a-second-build", "second", Some(&script));
        let second = symbols(&dir.path().join("second"));
        for m in wanted {
            assert_ne!(
                find(&first, m).1,
                find(&second, m).1,
                "the second build's names must differ, or this test checks nothing"
            );
        }
        let at = |m: &str| find(&second, m).0;
        assert!(
            at("5hot_a") < at("5twicet") && at("5twicet") < at("5hot_b"),
            "the listed functions in the listed order: {second:#?}"
        );
        for rest in ["8cold_one", "5twiceh"] {
            assert!(
                at(rest) > at("5hot_b"),
                "{rest} (not listed, or another instantiation) after the listed ones: {second:#?}"
            );
        }
    }
}
