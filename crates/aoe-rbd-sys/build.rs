//! Links librbd and librados (Debian's librbd-dev and librados-dev). Only an artifact that
//! uses this crate's functions needs them: a workspace build without the `rbd` feature of
//! aoe-cli never links them.
fn main() {
    println!("cargo:rustc-link-lib=dylib=rbd");
    println!("cargo:rustc-link-lib=dylib=rados");
}
