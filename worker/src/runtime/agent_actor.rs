//! The worker agent as a ractor actor, the worker's half of the control plane read the same way
//! as the coordinator's job actor: a config, a state (the worker's state machine), one message
//! enum. It owns the QUIC session (through `eqim_common::client`), the heartbeat status, SIGTERM
//! handling and the orders to the dedicated training thread, which makes every blocking tch and
//! c10d call. Network reads, trainer events, connection attempts and timers arrive as messages
//! from small pump tasks, so a handler never waits on a peer except to write one frame.
//!
//! ```text
//! Connecting --Connected--> InSession --Finished order--> Finishing --trainer Finished--> stop
//!     ^                        |   \--SIGTERM--> Leaving --closed / JIT timeout--> stop
//!     +------- Lost -----------+
//! ```

use super::trainer::{Command, Event};
use eqim_common::client::{Client, ClientConfig, ClientError, HeartbeatStatus};
use eqim_common::proto::{
    CoordinatorToWorker, Generation, WorkerPhase, WorkerToCoordinator, JIT_CHECKPOINT_TIMEOUT,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::sync::mpsc;
use std::time::Duration;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

/// How long the training thread gets to write its final state at the end of the job.
pub const FINISH_TIMEOUT: Duration = Duration::from_secs(60);

/// Makes a fresh client config for each connection attempt (the token may appear late).
pub type ConfigSource = Box<dyn FnMut() -> Result<ClientConfig, ClientError> + Send>;

/// How the agent ended, for the process to act on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The job finished and the training thread wrote its final state.
    Finished,
    /// SIGTERM: this worker left the job (after a just-in-time checkpoint when it was ordered).
    Terminated,
}

/// What the agent is started with.
pub struct AgentArgs {
    /// The coordinator's address, for messages.
    pub coordinator: String,
    pub client_config: ConfigSource,
    /// Give up when the coordinator cannot be reached for this long at start.
    pub connect_timeout: Duration,
    /// Once admitted, give up after this long without the coordinator (`None`: never).
    pub give_up_after: Option<Duration>,
    /// Orders to the training thread.
    pub commands: mpsc::Sender<Command>,
    /// The training thread's events (group ready, votes, checkpoints).
    pub events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    /// Where the agent's end is reported.
    pub done: oneshot::Sender<anyhow::Result<Ended>>,
}

/// Messages of the agent: everything it reacts to.
pub enum AgentMsg {
    /// A connection attempt ended.
    Connected(Result<Client, ClientError>),
    /// A message of session `session`; `None` when its connection ended.
    Coordinator {
        session: u64,
        msg: Option<CoordinatorToWorker>,
    },
    /// An event of the training thread; `None` when the thread stopped.
    Trainer(Option<Event>),
    Sigterm,
    /// The training thread did not finish within [`FINISH_TIMEOUT`].
    FinishTimeout,
    /// The coordinator did not let a leaving worker go within [`JIT_CHECKPOINT_TIMEOUT`].
    LeaveTimeout,
}

/// The worker's state machine.
enum Phase {
    Connecting,
    InSession {
        client: Client,
        session: u64,
    },
    /// The job is over; waiting for the training thread's final state.
    Finishing {
        client: Client,
    },
    /// `Leaving` was sent; relaying a just-in-time checkpoint until the coordinator lets go.
    Leaving {
        client: Client,
        session: u64,
    },
    Stopped,
}

pub struct AgentState {
    phase: Phase,
    status: HeartbeatStatus,
    sessions: u64,
    coordinator: String,
    client_config: std::sync::Arc<tokio::sync::Mutex<ConfigSource>>,
    connect_timeout: Duration,
    give_up_after: Option<Duration>,
    /// Admitted once: a lost coordinator is then retried for `give_up_after`.
    admitted_once: bool,
    commands: mpsc::Sender<Command>,
    done: Option<oneshot::Sender<anyhow::Result<Ended>>>,
    pumps: Vec<tokio::task::JoinHandle<()>>,
}

pub struct WorkerAgent;

impl Actor for WorkerAgent {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = AgentArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<AgentMsg>,
        args: AgentArgs,
    ) -> Result<AgentState, ActorProcessingErr> {
        let mut sigterm =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let me = myself.clone();
        let sigterm_pump = tokio::spawn(async move {
            while sigterm.recv().await.is_some() {
                if me.cast(AgentMsg::Sigterm).is_err() {
                    break;
                }
            }
        });
        let me = myself.clone();
        let mut events = args.events;
        let trainer_pump = tokio::spawn(async move {
            loop {
                let event = events.recv().await;
                let end = event.is_none();
                if me.cast(AgentMsg::Trainer(event)).is_err() || end {
                    break;
                }
            }
        });
        let state = AgentState {
            phase: Phase::Connecting,
            status: HeartbeatStatus {
                generation: Generation(0),
                phase: WorkerPhase::Joining,
                step: 0,
            },
            sessions: 0,
            coordinator: args.coordinator,
            client_config: std::sync::Arc::new(tokio::sync::Mutex::new(args.client_config)),
            connect_timeout: args.connect_timeout,
            give_up_after: args.give_up_after,
            admitted_once: false,
            commands: args.commands,
            done: Some(args.done),
            pumps: vec![sigterm_pump, trainer_pump],
        };
        state.connect(&myself);
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<AgentMsg>,
        msg: AgentMsg,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        let result = match msg {
            AgentMsg::Connected(result) => state.on_connected(&myself, result),
            AgentMsg::Coordinator { session, msg } => {
                state.on_coordinator(&myself, session, msg).await
            }
            AgentMsg::Trainer(event) => state.on_trainer(&myself, event).await,
            AgentMsg::Sigterm => state.on_sigterm(&myself).await,
            AgentMsg::FinishTimeout => Err(anyhow::anyhow!(
                "the training thread did not finish within {FINISH_TIMEOUT:?}"
            )),
            AgentMsg::LeaveTimeout => {
                if matches!(state.phase, Phase::Leaving { .. }) {
                    warn!(timeout = ?JIT_CHECKPOINT_TIMEOUT, "the coordinator did not let this worker go within JIT_CHECKPOINT_TIMEOUT; leaving anyway");
                    state.end(Ok(Ended::Terminated)).await;
                }
                Ok(())
            }
        };
        if let Err(e) = result {
            state.end(Err(e)).await;
        }
        if matches!(state.phase, Phase::Stopped) {
            myself.stop(None);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _myself: ActorRef<AgentMsg>,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        for pump in &state.pumps {
            pump.abort();
        }
        if let Some(done) = state.done.take() {
            let _ignored = done.send(Err(anyhow::anyhow!("the worker agent stopped")));
        }
        Ok(())
    }
}

impl AgentState {
    /// How long to keep trying to reach the coordinator now.
    fn patience(&self) -> Duration {
        match (self.admitted_once, self.give_up_after) {
            (false, _) => self.connect_timeout,
            (true, Some(limit)) => limit,
            (true, None) => Duration::MAX,
        }
    }

    /// Starts a connection attempt (retried with capped backoff for [`Self::patience`]) on its
    /// own task.
    fn connect(&self, myself: &ActorRef<AgentMsg>) {
        let me = myself.clone();
        let source = self.client_config.clone();
        let timeout = self.patience();
        tokio::spawn(async move {
            let mut source = source.lock().await;
            let result = Client::connect_with_retry_from(&mut *source, timeout).await;
            let _ignored = me.cast(AgentMsg::Connected(result));
        });
    }

    /// Pumps a new session's messages into the mailbox, tagged with the session number.
    fn start_session(&mut self, myself: &ActorRef<AgentMsg>, mut client: Client) {
        self.sessions += 1;
        let session = self.sessions;
        let mut inbox = client.take_inbox();
        let me = myself.clone();
        self.pumps.push(tokio::spawn(async move {
            loop {
                let msg = inbox.recv().await;
                let end = msg.is_none();
                if me.cast(AgentMsg::Coordinator { session, msg }).is_err() || end {
                    break;
                }
            }
        }));
        self.status.phase = WorkerPhase::Joining;
        client.set_status(self.status);
        self.phase = Phase::InSession { client, session };
    }

    fn on_connected(
        &mut self,
        myself: &ActorRef<AgentMsg>,
        result: Result<Client, ClientError>,
    ) -> anyhow::Result<()> {
        if !matches!(self.phase, Phase::Connecting) {
            return Ok(()); // SIGTERM came first: the agent is on its way out.
        }
        match result {
            Ok(client) => {
                self.admitted_once = true;
                self.start_session(myself, client);
                Ok(())
            }
            Err(ClientError::Refused(reason)) => Err(anyhow::anyhow!(
                "the coordinator at {} refused this worker: {reason}",
                self.coordinator
            )),
            Err(e) => {
                let limit = if self.admitted_once {
                    "--give-up-after"
                } else {
                    "--connect-timeout"
                };
                Err(anyhow::Error::new(e).context(format!(
                    "cannot reach the coordinator at {} within {limit} {:?}",
                    self.coordinator,
                    self.patience()
                )))
            }
        }
    }

    fn forward(&self, command: Command) -> anyhow::Result<()> {
        self.commands
            .send(command)
            .map_err(|_| anyhow::anyhow!("the training thread stopped (see its error above)"))
    }

    fn set_status(&self) {
        if let Phase::InSession { client, .. } = &self.phase {
            client.set_status(self.status);
        }
    }

    /// Sends to the coordinator; a failed write means the session is lost.
    async fn send(&mut self, myself: &ActorRef<AgentMsg>, msg: WorkerToCoordinator) {
        let sent = match &self.phase {
            Phase::InSession { client, .. } | Phase::Leaving { client, .. } => {
                client.send(&msg).await
            }
            _ => return,
        };
        if let Err(e) = sent {
            debug!(cause = %e, kind = msg.kind(), "write to the coordinator failed");
            self.session_lost(myself).await;
        }
    }

    async fn session_lost(&mut self, myself: &ActorRef<AgentMsg>) {
        match std::mem::replace(&mut self.phase, Phase::Connecting) {
            Phase::InSession { client, .. } => {
                warn!(reason = ?client.close_reason(), "lost the coordinator; reconnecting");
                drop(client);
                self.connect(myself);
            }
            Phase::Leaving { client, .. } => {
                client.close().await;
                self.finish_with(Ok(Ended::Terminated));
            }
            other => self.phase = other,
        }
    }

    async fn on_coordinator(
        &mut self,
        myself: &ActorRef<AgentMsg>,
        session: u64,
        msg: Option<CoordinatorToWorker>,
    ) -> anyhow::Result<()> {
        let current = match &self.phase {
            Phase::InSession { session: s, .. } | Phase::Leaving { session: s, .. } => *s,
            _ => return Ok(()),
        };
        if session != current {
            return Ok(()); // a message of an older connection
        }
        let Some(msg) = msg else {
            self.session_lost(myself).await;
            return Ok(());
        };
        if matches!(self.phase, Phase::Leaving { .. }) {
            return self.while_leaving(msg).await;
        }
        self.in_session(myself, msg)
    }

    fn in_session(
        &mut self,
        myself: &ActorRef<AgentMsg>,
        msg: CoordinatorToWorker,
    ) -> anyhow::Result<()> {
        match msg {
            CoordinatorToWorker::Welcome {
                generation,
                rank,
                world_size,
                rendezvous,
                resume,
            } => {
                info!(%generation, rank, world_size, step = resume.step, "welcome");
                self.status = HeartbeatStatus {
                    generation,
                    phase: WorkerPhase::Syncing,
                    step: resume.step,
                };
                self.set_status();
                self.forward(Command::Join {
                    generation,
                    rank,
                    world_size,
                    rendezvous,
                    resume,
                })
            }
            CoordinatorToWorker::Assign(assignment) => self.forward(Command::Step(assignment)),
            CoordinatorToWorker::Commit {
                generation,
                step,
                checkpoint,
            } => self.forward(Command::Commit {
                generation,
                step,
                checkpoint,
            }),
            CoordinatorToWorker::Abort {
                generation,
                step,
                reason,
            } => {
                info!(%generation, step, ?reason, "step aborted");
                self.forward(Command::Abort { generation, step })
            }
            CoordinatorToWorker::Paused { reason } => {
                info!(%reason, "paused");
                Ok(())
            }
            CoordinatorToWorker::Finished { reason } => {
                info!(%reason, "job finished");
                self.forward(Command::Finish)?;
                if let Phase::InSession { client, .. } =
                    std::mem::replace(&mut self.phase, Phase::Connecting)
                {
                    self.phase = Phase::Finishing { client };
                }
                myself.send_after(FINISH_TIMEOUT, || AgentMsg::FinishTimeout);
                Ok(())
            }
            other => {
                debug!(kind = other.kind(), "ignored message");
                Ok(())
            }
        }
    }

    /// While leaving, only what completes the committed state (and a just-in-time checkpoint)
    /// goes to the training thread; votes of the abandoned step are not sent.
    async fn while_leaving(&mut self, msg: CoordinatorToWorker) -> anyhow::Result<()> {
        let command = match msg {
            CoordinatorToWorker::Finished { .. } => {
                self.end(Ok(Ended::Terminated)).await;
                return Ok(());
            }
            CoordinatorToWorker::CheckpointNow {
                generation,
                steps,
                name,
            } => {
                info!(%generation, steps, %name, "just-in-time checkpoint ordered");
                Command::CheckpointNow {
                    generation,
                    steps,
                    name,
                }
            }
            CoordinatorToWorker::Commit {
                generation,
                step,
                checkpoint,
            } => Command::Commit {
                generation,
                step,
                checkpoint,
            },
            CoordinatorToWorker::Abort {
                generation, step, ..
            } => Command::Abort { generation, step },
            other => {
                debug!(kind = other.kind(), "ignored while leaving");
                return Ok(());
            }
        };
        if self.forward(command).is_err() {
            warn!("the training thread stopped while leaving");
            self.end(Ok(Ended::Terminated)).await;
        }
        Ok(())
    }

    async fn on_trainer(
        &mut self,
        myself: &ActorRef<AgentMsg>,
        event: Option<Event>,
    ) -> anyhow::Result<()> {
        let Some(event) = event else {
            if matches!(self.phase, Phase::Leaving { .. }) {
                self.end(Ok(Ended::Terminated)).await;
                return Ok(());
            }
            anyhow::bail!("the training thread stopped (see its error above)");
        };
        let leaving = matches!(self.phase, Phase::Leaving { .. });
        match event {
            Event::GroupReady { generation } if !leaving => {
                self.status.phase = WorkerPhase::Training;
                self.set_status();
                self.send(myself, WorkerToCoordinator::GroupReady { generation })
                    .await;
            }
            Event::Vote {
                generation,
                step,
                outcome,
                ..
            } if !leaving => {
                let vote = WorkerToCoordinator::Vote {
                    generation,
                    step,
                    outcome,
                };
                self.send(myself, vote).await;
            }
            Event::Applied { step } => {
                self.status.step = step + 1;
                self.set_status();
                if step % 10 == 0 {
                    info!(step, "step applied");
                }
            }
            Event::CheckpointWritten {
                generation,
                steps,
                files,
            } => {
                let written = WorkerToCoordinator::CheckpointWritten {
                    generation,
                    step: steps,
                    files,
                };
                self.send(myself, written).await;
            }
            Event::CheckpointFailed { reason } if leaving => {
                warn!(%reason, "just-in-time checkpoint not written");
                self.end(Ok(Ended::Terminated)).await;
            }
            Event::CheckpointFailed { reason } => warn!(%reason, "checkpoint not written"),
            Event::Finished => self.end(Ok(Ended::Finished)).await,
            _ => {}
        }
        Ok(())
    }

    /// SIGTERM: say `Leaving` and keep the session until the coordinator lets go, for at most
    /// [`JIT_CHECKPOINT_TIMEOUT`]; when this worker holds the last copy of the training state,
    /// the coordinator first orders a just-in-time checkpoint, relayed to the training thread.
    async fn on_sigterm(&mut self, myself: &ActorRef<AgentMsg>) -> anyhow::Result<()> {
        match std::mem::replace(&mut self.phase, Phase::Stopped) {
            Phase::InSession { client, session } => {
                info!(generation = %self.status.generation, "SIGTERM: leaving the job");
                self.status.phase = WorkerPhase::Draining;
                client.set_status(self.status);
                let leaving = WorkerToCoordinator::Leaving {
                    generation: self.status.generation,
                    reason: "SIGTERM".into(),
                };
                if let Err(e) = client.send(&leaving).await {
                    warn!(cause = %e, "could not say goodbye to the coordinator");
                    client.close().await;
                    self.finish_with(Ok(Ended::Terminated));
                    return Ok(());
                }
                self.phase = Phase::Leaving { client, session };
                myself.send_after(JIT_CHECKPOINT_TIMEOUT, || AgentMsg::LeaveTimeout);
            }
            Phase::Connecting => {
                info!("SIGTERM while connecting; exiting");
                self.finish_with(Ok(Ended::Terminated));
            }
            other => self.phase = other, // already finishing or leaving
        }
        Ok(())
    }

    /// Closes the session (if any) and reports the end.
    async fn end(&mut self, result: anyhow::Result<Ended>) {
        match std::mem::replace(&mut self.phase, Phase::Stopped) {
            Phase::InSession { client, .. }
            | Phase::Finishing { client }
            | Phase::Leaving { client, .. } => client.close().await,
            Phase::Connecting | Phase::Stopped => {}
        }
        self.finish_with(result);
    }

    fn finish_with(&mut self, result: anyhow::Result<Ended>) {
        self.phase = Phase::Stopped;
        if let Some(done) = self.done.take() {
            let _ignored = done.send(result);
        }
    }
}
