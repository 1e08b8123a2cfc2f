// mimalloc: the proxy allocates small, short-lived buffers and header maps
// on every request; glibc malloc costs measurably more CPU per request
// (bench/proxy.sh).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tether::cli::main()
}
