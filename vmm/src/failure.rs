//! Why a vCPU's guest program did not succeed: [`GuestFailure`], reported by
//! the vCPU loop, told to command plans and summarised by runs and scenarios.
//! A leaf module, so that all of them can name it.

use guest_image::protocol::ExceptionRecord;
use serde::Serialize;

/// Why a vCPU's guest program did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GuestFailure {
    /// The guest took an exception.
    #[error("vCPU {vcpu}: guest exception {name} (vector {vector}, error code {error_code:#x}) at RIP {rip:#x}, CR2 {cr2:#x}")]
    Exception {
        /// vCPU index.
        vcpu: u64,
        /// Mnemonic (#PF...).
        name: &'static str,
        /// Vector.
        vector: u64,
        /// Error code.
        error_code: u64,
        /// Faulting RIP.
        rip: u64,
        /// CR2.
        cr2: u64,
    },
    /// VERIFY found a word that differs from the pattern.
    #[error(
        "vCPU {vcpu}: verify mismatch at {gpa:#x}: expected {expected:#018x}, found {actual:#018x}"
    )]
    VerifyMismatch {
        /// vCPU index.
        vcpu: u64,
        /// Address of the word.
        gpa: u64,
        /// Pattern value.
        expected: u64,
        /// Value found.
        actual: u64,
    },
    /// A command ended with a status other than OK.
    #[error("vCPU {vcpu}: {command} failed with guest status {status:#x}")]
    CommandFailed {
        /// vCPU index.
        vcpu: u64,
        /// The command.
        command: String,
        /// Its status.
        status: u32,
    },
    /// The guest accessed guest-physical memory that has no memslot.
    #[error(
        "vCPU {vcpu}: guest {kind} of {size} bytes at unplugged guest-physical address {gpa:#x}"
    )]
    UnpluggedAccess {
        /// vCPU index.
        vcpu: u64,
        /// Address.
        gpa: u64,
        /// "read" or "write".
        kind: &'static str,
        /// Access size.
        size: usize,
    },
    /// The guest wrote to read-only (protected) memory.
    #[error(
        "vCPU {vcpu}: guest write of {size} bytes to read-only guest-physical address {gpa:#x}"
    )]
    ReadOnlyWrite {
        /// vCPU index.
        vcpu: u64,
        /// Address.
        gpa: u64,
        /// Access size.
        size: usize,
    },
    /// Triple fault.
    #[error("vCPU {vcpu}: guest shut down (triple fault)")]
    Shutdown {
        /// vCPU index.
        vcpu: u64,
    },
    /// An exit the VMM does not expect.
    #[error("vCPU {vcpu}: unexpected exit: {what}")]
    UnexpectedExit {
        /// vCPU index.
        vcpu: u64,
        /// Description.
        what: String,
    },
    /// KVM_RUN failed.
    #[error("vCPU {vcpu}: KVM_RUN failed: {error}{hint}")]
    Kvm {
        /// vCPU index.
        vcpu: u64,
        /// The error text.
        error: String,
        /// Explanation for known errnos.
        hint: &'static str,
    },
    /// The run was stopped from outside (timeout, signal, another vCPU failed).
    #[error("vCPU {vcpu}: stopped")]
    Stopped {
        /// vCPU index.
        vcpu: u64,
    },
}

impl GuestFailure {
    /// Whether the guest program caused it (as opposed to KVM, the VMM or a
    /// stop): only these can end just a command under a recoverable plan.
    pub fn is_guest_fault(&self) -> bool {
        matches!(
            self,
            GuestFailure::Exception { .. }
                | GuestFailure::VerifyMismatch { .. }
                | GuestFailure::CommandFailed { .. }
                | GuestFailure::UnpluggedAccess { .. }
                | GuestFailure::ReadOnlyWrite { .. }
        )
    }
}

impl GuestFailure {
    /// The failure for the exception `record` the guest reported on `vcpu`.
    pub fn exception(vcpu: u64, record: &ExceptionRecord) -> Self {
        GuestFailure::Exception {
            vcpu,
            name: vector_name(record.vector),
            vector: record.vector,
            error_code: record.error_code,
            rip: record.rip,
            cr2: record.cr2,
        }
    }
}

impl Serialize for GuestFailure {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

fn vector_name(v: u64) -> &'static str {
    const NAMES: [&str; 22] = [
        "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "CSO", "#TS", "#NP", "#SS",
        "#GP", "#PF", "reserved", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
    ];
    NAMES.get(v as usize).copied().unwrap_or("exception")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exception_is_named_by_its_vector() {
        let record = ExceptionRecord {
            vector: 14,
            error_code: 4,
            rip: 0x10_0000,
            cr2: 0xdead_0000,
            rsp: 0,
        };
        let failure = GuestFailure::exception(2, &record);
        assert!(failure.is_guest_fault());
        assert_eq!(
            failure.to_string(),
            "vCPU 2: guest exception #PF (vector 14, error code 0x4) at RIP 0x100000, CR2 0xdead0000"
        );
        let unknown = ExceptionRecord {
            vector: 40,
            ..record
        };
        let text = GuestFailure::exception(0, &unknown).to_string();
        assert!(
            text.contains("guest exception exception (vector 40"),
            "{text}"
        );
    }
}
