use std::process::ExitCode;

fn main() -> ExitCode {
    inventory_service::main()
}
