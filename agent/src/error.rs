//! The library's one error type, as the binary sees it: what went wrong, and the exit code each
//! kind ends the agent with.
use crate::{
    budget::BudgetTooSmall, export::otlp::ConfigError, kube::KubeError, loader::LoaderError, replay::ReplayError,
    views::analyze::AnalyzeError,
};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad `OTEL_*` setting or a file it names.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A `--memory-limit` too small to run in.
    #[error(transparent)]
    Budget(#[from] BudgetTooSmall),
    /// Kubernetes metadata asked for and not possible as configured.
    #[error(transparent)]
    Kubernetes(#[from] KubeError),
    /// The kernel side could not be loaded or attached.
    #[error(transparent)]
    Kernel(#[from] LoaderError),
    /// A recording could not be read.
    #[error(transparent)]
    Recording(#[from] ReplayError),
    /// Saved spans could not be read.
    #[error(transparent)]
    Analyze(#[from] AnalyzeError),
}

impl Error {
    /// 2 for a configuration the user must change (as for a bad flag), 1 for anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Self::Config(_) | Self::Budget(_) | Self::Kubernetes(_) => 2,
            Self::Kernel(_) | Self::Recording(_) | Self::Analyze(_) => 1,
        }
    }
}
