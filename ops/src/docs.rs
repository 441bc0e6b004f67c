//! `smartsign-ctl docs`: man pages and shell completions for `smartsignd` and `smartsign-ctl`,
//! made from their clap definitions, so they never disagree with `--help`. Laid out under
//! `--out-dir` as under `/usr/share`, which is where `ops/deploy/install` puts them.

use std::path::{Path, PathBuf};

use clap_complete::Shell;

/// Arguments of `docs`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example (what ops/deploy/install runs):
  smartsign-ctl docs --out-dir /usr/share

writes man/man8/smartsignd.8, man/man1/smartsign-ctl.1 and a page per subcommand
(smartsign-ctl-audit-verify.1, ...), bash-completion/completions/, zsh/vendor-completions/ and
fish/vendor_completions.d/.")]
pub(crate) struct DocsArgs {
    /// The directory to write into, laid out as /usr/share.
    #[arg(long, value_name = "DIR")]
    out_dir: PathBuf,
}

/// Where each shell looks for a vendor's completions, under /usr/share, and the file's name.
fn completion_path(shell: Shell, bin: &str) -> PathBuf {
    match shell {
        Shell::Zsh => Path::new("zsh/vendor-completions").join(format!("_{bin}")),
        Shell::Fish => Path::new("fish/vendor_completions.d").join(format!("{bin}.fish")),
        _ => Path::new("bash-completion/completions").join(bin),
    }
}

fn write(path: &Path, bytes: &[u8]) -> Result<(), String> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|error| format!("cannot create {}: {error}", parent.display()))?;
    }
    std::fs::write(path, bytes).map_err(|error| format!("cannot write {}: {error}", path.display()))
}

/// The man page of `command` (named `name`) in `section`, then one for each of its
/// subcommands, named as git names its own (`smartsign-ctl-audit-verify`). Gives the pages.
fn man_pages(
    command: &clap::Command,
    name: &str,
    section: &str,
    dir: &Path,
) -> Result<Vec<PathBuf>, String> {
    let mut pages = Vec::new();
    let page = command.clone().name(name.to_owned());
    let mut text = Vec::new();
    clap_mangen::Man::new(page)
        .section(section)
        .render(&mut text)
        .map_err(|error| format!("cannot render the man page of {name}: {error}"))?;
    let path = dir.join(format!("{name}.{section}"));
    write(&path, &text)?;
    pages.push(path);
    for sub in command.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        let sub_name = format!("{name}-{}", sub.get_name());
        pages.extend(man_pages(sub, &sub_name, section, dir)?);
    }
    Ok(pages)
}

pub(crate) fn run(args: DocsArgs, ctl: clap::Command) -> Result<(), Box<dyn std::error::Error>> {
    let mut written = Vec::new();
    let daemon = smartsignd::command().name("smartsignd");
    let ctl = ctl.name("smartsign-ctl");
    written.extend(man_pages(
        &daemon,
        "smartsignd",
        "8",
        &args.out_dir.join("man/man8"),
    )?);
    written.extend(man_pages(
        &ctl,
        "smartsign-ctl",
        "1",
        &args.out_dir.join("man/man1"),
    )?);
    for mut command in [daemon, ctl] {
        let bin = command.get_name().to_owned();
        for shell in [Shell::Bash, Shell::Zsh, Shell::Fish] {
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, &bin, &mut script);
            let path = args.out_dir.join(completion_path(shell, &bin));
            write(&path, &script)?;
            written.push(path);
        }
    }
    for path in &written {
        println!("{}", path.display());
    }
    eprintln!("smartsign-ctl docs: {} files written", written.len());
    Ok(())
}
