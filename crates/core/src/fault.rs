//! Test-only fault injection, through the environment variable `SLUICE_FAULT`, so that the
//! integration tests can prove what a panic or a failing sink does to a real process:
//! `sink-panic` (the first sink write panics), `model-panic` (the first model run panics),
//! `sink-fail` (every sink write fails with a transient error). Unset in production.

/// A fault the tests can inject.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    SinkPanic,
    ModelPanic,
    SinkFail,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::SinkPanic => "sink-panic",
            Fault::ModelPanic => "model-panic",
            Fault::SinkFail => "sink-fail",
        }
    }
}

/// Whether `SLUICE_FAULT` names `fault`.
pub fn injected(fault: Fault) -> bool {
    std::env::var("SLUICE_FAULT").is_ok_and(|v| v.split(',').any(|f| f.trim() == fault.name()))
}

/// A sink wrapped by the injected sink faults.
pub struct FaultySink {
    pub inner: Box<dyn crate::sink::SinkWriter>,
    pub panic_once: bool,
    pub fail: bool,
}

impl FaultySink {
    /// Wraps `inner` when `SLUICE_FAULT` names a sink fault; otherwise returns it as it is.
    pub fn wrap(inner: Box<dyn crate::sink::SinkWriter>) -> Box<dyn crate::sink::SinkWriter> {
        let (panic_once, fail) = (injected(Fault::SinkPanic), injected(Fault::SinkFail));
        if panic_once || fail {
            Box::new(FaultySink { inner, panic_once, fail })
        } else {
            inner
        }
    }
}

impl crate::sink::SinkWriter for FaultySink {
    fn kind(&self) -> &'static str {
        self.inner.kind()
    }
    fn write(&mut self, batch: &crate::sink::EpochBatch) -> Result<(), crate::sink::SinkError> {
        if std::mem::take(&mut self.panic_once) {
            panic!("injected fault: the sink panicked (SLUICE_FAULT=sink-panic)");
        }
        if self.fail {
            return Err(crate::sink::SinkError::Transient("injected fault: the sink is failing (SLUICE_FAULT=sink-fail)".into()));
        }
        self.inner.write(batch)
    }
    fn stores_checkpoints(&self) -> bool {
        self.inner.stores_checkpoints()
    }
}
