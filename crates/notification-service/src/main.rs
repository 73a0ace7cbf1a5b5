use std::process::ExitCode;

fn main() -> ExitCode {
    notification_service::main()
}
