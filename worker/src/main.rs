//! `eqim`: the one command line users meet first (its parser and commands are in
//! [`eqim_worker::cli`]).

fn main() -> anyhow::Result<()> {
    eqim_worker::cli::main()
}
