use std::process::ExitCode;

fn main() -> ExitCode {
    order_service::main()
}
