//! The code layout's linker script, made from `link/weft.order` (shared by `build.rs`, which
//! links the release `weft` with it, and `tests/layout.rs`).

use regex::Regex;

/// The linker script that lays out the functions `order` names, one per line, in that order,
/// ahead of the rest of the text.
///
/// Each function is in a section of its own (rustc's and the C builds' function sections:
/// `.text.<symbol>`, `.text.unlikely.<symbol>` for a cold one, `.text.startup.<symbol>` for a
/// C constructor), so the script places sections, one `*( )` per function: a pattern's
/// matches are kept in input order, so functions sharing one `*( )` would lose the file's
/// order. The patterns replace what in a symbol's name is a hash, because that hash
/// covers the compiler, the dependencies' versions and the build profile, and an exact name
/// would miss whenever any of them changed (one dependency added to weft once left 686 of
/// 2,231 names valid):
/// - v0 Rust names (`_R`; `.cargo/config.toml` asks for them) spell out a generic function's
///   type arguments and carry a crate's disambiguator as `Cs<base 62>_`, and back-references as
///   `B<base 62>_` (byte offsets, which move when a disambiguator's length does): `Cs*_`,
///   `B*_`; and a generic function's copy ends in the crate it was instantiated in
///   (`Cs*_<length><crate>` or a back-reference), which another build may choose differently
///   (in a bench-profile build 64 of 2,902 listed functions had moved): `*`;
/// - legacy Rust names end in `17h<16 hex digits>E`: `17h*E`;
/// - and LTO may append `.<n>` to a duplicate's name: `.*`;
/// - the crypto libraries' C and assembly names begin with their version (`ring_core_0_17_14__`,
///   `aws_lc_0_47_0_`), which any release of them changes: `ring_core_*_`, `aws_lc_*_`.
///
/// With legacy names a pattern matches every instantiation of a generic function, thousands of
/// functions that never ran among those that did (the hot text grew from 3.7 to 6.8 MB and idle
/// RSS from 11 to 15–17 MB): hence the v0 names. A pattern that matches nothing (the function
/// is gone) costs nothing. `INSERT BEFORE .text` keeps the linker's default layout for all
/// else.
///
/// A line that is not a symbol name (a symbol's characters: letters, digits, `_`, `.`, `$`)
/// is an error naming it: in the script it would be a glob or end the pattern list, and the
/// link would fail far from the cause or place the wrong functions.
pub fn script(order: &str) -> Result<String, Box<dyn std::error::Error>> {
    // A disambiguator is a 64-bit hash (at most 11 digits of base 62), a back-reference an offset
    // in the name (3 digits reach 238,327 bytes); the bounds keep `B` and `_` inside an
    // identifier (`8LogBatchE9drop_slow`) from being taken for one.
    let v0 = Regex::new(r"(Cs)[0-9A-Za-z]{0,11}_|(B)[0-9A-Za-z]{0,3}_")?;
    let legacy = Regex::new(r"17h[0-9a-f]{16}E")?;
    let suffix = Regex::new(r"\.[0-9]+$")?;
    let versioned = Regex::new(r"^(ring_core|aws_lc)_[0-9]+_[0-9]+_[0-9]+_")?;
    let mut seen = std::collections::HashSet::new();
    let mut script = String::from("SECTIONS\n{\n  .text.hot : {\n");
    for (number, name) in order.lines().enumerate() {
        let name = name.trim();
        if name.is_empty() {
            continue;
        }
        if !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '$'))
        {
            return Err(format!(
                "link/weft.order line {}: {name:?} is not a symbol name (letters, digits, `_`, \
                 `.`, `$`); scripts/text-order writes the file",
                number + 1
            )
            .into());
        }
        // LTO's `.<n>` comes off first and back as `.*`, unless the pattern ends in `*` anyway.
        let (name, lto) = match suffix.find(name) {
            Some(m) => (&name[..m.start()], true),
            None => (name, false),
        };
        let mut pattern = if name.starts_with("_R") {
            let pattern = v0.replace_all(name, "${1}${2}*_");
            match without_instantiating_crate(&pattern) {
                Some(path) => format!("{path}*"),
                None => pattern.into_owned(),
            }
        } else if name.starts_with("_ZN") {
            legacy.replace(name, "17h*E").into_owned()
        } else if versioned.is_match(name) {
            versioned.replace(name, "${1}_*_").into_owned()
        } else {
            name.to_string()
        };
        if lto && !pattern.ends_with('*') {
            pattern.push_str(".*");
        }
        if seen.insert(pattern.to_string()) {
            script.push_str(&format!(
                "    *(.text.{pattern} .text.unlikely.{pattern} .text.startup.{pattern})\n"
            ));
        }
    }
    script.push_str("  }\n}\nINSERT BEFORE .text;\n");
    Ok(script)
}

/// A v0 pattern without the instantiating crate that ends it, if it has one: a crate root
/// `Cs*_<length><name>` whose name runs to the end, or a back-reference `B*_` (a path ends in
/// an identifier and generic arguments in `E`, so a final back-reference is that crate).
fn without_instantiating_crate(pattern: &str) -> Option<&str> {
    if let Some(path) = pattern.strip_suffix("B*_") {
        return Some(path);
    }
    let at = pattern.rfind("Cs*_")?;
    let crate_name = &pattern[at + "Cs*_".len()..];
    let digits = crate_name.bytes().take_while(u8::is_ascii_digit).count();
    let length: usize = crate_name[..digits].parse().ok()?;
    (crate_name.len() - digits == length).then_some(&pattern[..at])
}
