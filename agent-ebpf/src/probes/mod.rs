pub mod golang;
pub mod loops;
pub mod sock;
pub mod syscalls;
