//! Compiles `proto/realtime.proto` with protox, so no system `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=../../proto");
    let fds = protox::compile(["realtime.proto"], ["../../proto"])?;
    prost_build::Config::new().compile_fds(fds)?;
    Ok(())
}
