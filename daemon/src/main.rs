//! `smartsignd`: the signing daemon. See `smartsignd --help` and the README.

#![forbid(unsafe_code)]

// HSM replies are freed on another thread than the one that made them; mimalloc handles that
// pattern far better than the system allocator (see the README's benchmarks).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    smartsignd::main()
}
