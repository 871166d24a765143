//! Builds libzmq from zeromq-src with CURVE, linking the libsodium that
//! `libsodium-sys-stable` built from its bundled, signature-checked source.

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build/main.rs");
    println!("cargo:rerun-if-env-changed=PROFILE");
    let include = env::var("DEP_SODIUM_INCLUDE")
        .expect("libsodium-sys-stable did not say where libsodium's headers are");
    let lib = env::var("DEP_SODIUM_LIB")
        .expect("libsodium-sys-stable did not say where libsodium's library is");
    zeromq_src::Build::new()
        .with_libsodium(Some(zeromq_src::LibLocation::new(lib, include)))
        .build();
}
