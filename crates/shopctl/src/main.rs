fn main() -> std::process::ExitCode {
    shopctl::main()
}
