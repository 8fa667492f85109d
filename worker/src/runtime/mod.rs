//! The worker side of the distributed runtime: the agent (`eqim worker`), its training thread,
//! the [`trainable::Trainable`] interface the runtime drives, and `eqim launch`.

pub mod agent;
pub mod agent_actor;
pub mod coordinator_process;
pub mod generator_trainable;
pub mod launch_cmd;
pub mod ledger_cmd;
pub mod local;
pub mod trainable;
pub mod trainer;
