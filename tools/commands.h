// How shotdb subcommands are registered with the command line, and the conventions they follow.
//
// shotdb_main.cc owns the CLI::App and the global options; each group of commands adds its
// subcommands through one Register function. A command is an action returning its exit code:
//   0  success;
//   1  the command failed (it has printed one line naming what failed, see cli::Fail);
//   2  usage error (bad or missing arguments: CLI11 reports these before any action runs).
// Verification-style commands also return 1 when they found a problem (e.g. a corrupt block).
#ifndef SHOTDB_TOOLS_COMMANDS_H_
#define SHOTDB_TOOLS_COMMANDS_H_

#include <CLI/CLI.hpp>
#include <functional>
#include <string>

namespace shotdb::cli {

// Options that come before the subcommand. Read them inside the actions only: they are filled in
// while the command line is parsed, after registration.
struct GlobalOptions {
  // --store DIR; default $SHOTDB_STORE, else ./shotdb-store.
  std::string store_dir;
};

// Makes `action` the body of subcommand `sub`: a nonzero return becomes the process exit code.
// (Implemented by throwing CLI::RuntimeError from the CLI11 callback, which shotdb_main.cc turns
// into the exit code; no exception leaves the program.)
void SetAction(CLI::App* sub, std::function<int()> action);

// ls, info, blocks, show, search, verify, stats, rm, export, import, compact (inspect_commands.cc).
void RegisterInspectCommands(CLI::App& app, const GlobalOptions& global);

#ifdef SHOTDB_MODEL_COMMANDS
// build, append, query, eval (model_commands.cc): only in `shotdb-model`, which links libtorch
// (shotdb_main.cc says how `shotdb` reaches them).
void RegisterModelCommands(CLI::App& app, const GlobalOptions& global);
#endif

}  // namespace shotdb::cli

#endif  // SHOTDB_TOOLS_COMMANDS_H_
