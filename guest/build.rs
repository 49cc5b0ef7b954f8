//! Links the guest at `guest_abi::IMAGE_ADDR` with `link.ld`, as a non-PIE static executable, when it is built
//! for `x86_64-unknown-none`. Host builds (the library's unit tests) get no linker arguments.

fn main() {
    println!("cargo:rerun-if-changed=link.ld");
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var("TARGET").as_deref() == Ok("x86_64-unknown-none") {
        let dir = std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR");
        // The target defaults to static PIE. The VMM loads PT_LOAD segments at their addresses and applies no
        // relocations, so link a plain ET_EXEC: the PIC code works unchanged at its link address.
        println!("cargo:rustc-link-arg-bins=--no-pie");
        println!("cargo:rustc-link-arg-bins=-T{dir}/link.ld");
    }
}
