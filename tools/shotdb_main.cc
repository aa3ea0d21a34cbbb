// shotdb: the command-line interface to a shotdb store (docs/cli.md).
//
// Two executables are built from this file. `shotdb` holds the commands that run no model (ls,
// info, blocks, show, search, verify, stats, rm, export, import, compact) and links no libtorch, so
// it starts in milliseconds. The model commands (build, append, query, eval) live in
// `shotdb-model` (SHOTDB_MODEL_COMMANDS, built only with libtorch), the same program with
// libtorch: `shotdb` hands such a command line over to it unchanged (execv of the `shotdb-model`
// next to its own executable), so users only ever type `shotdb`.
#include <unistd.h>

#include <CLI/CLI.hpp>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iostream>
#include <string>
#include <string_view>

#include "tools/commands.h"
#include "util/heap_env.h"
#include "util/openmp_env.h"

namespace shotdb::cli {

void SetAction(CLI::App* sub, std::function<int()> action) {
  sub->callback([action = std::move(action)] {
    const int rc = action();
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace shotdb::cli

namespace {

constexpr int kUsageError = 2;
constexpr const char* kModelCommands[][2] = {
    {"build", "Encode a demonstration pool into a task (resumable)"},
    {"append", "Add demonstrations to a task as new blocks"},
    {"query", "Answer a query from a task's pool"},
    {"eval", "Accuracy and latency over a labelled test set"},
};

#ifndef SHOTDB_MODEL_COMMANDS
// The model command that argv names, if any: the first argument that is not a global option.
const char* ModelCommandIn(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--store") {
      ++i;
      continue;
    }
    if (arg.rfind("--store=", 0) == 0) continue;
    for (const auto& command : kModelCommands) {
      if (arg == command[0]) return command[0];
    }
    return nullptr;
  }
  return nullptr;
}

// The path of `shotdb-model` next to this executable ("" when /proc/self/exe is unreadable).
std::string ModelHelperPath() {
  char self[4096];
  const ssize_t n = ::readlink("/proc/self/exe", self, sizeof(self) - 1);
  if (n <= 0) return "";
  std::string path(self, static_cast<size_t>(n));
  return path.substr(0, path.rfind('/') + 1) + "shotdb-model";
}
#endif

}  // namespace

int main(int argc, char** argv) {
  using shotdb::cli::GlobalOptions;
#ifdef SHOTDB_MODEL_COMMANDS
  shotdb::ReexecWithPassiveOpenMpWait(argv);  // when run directly, not through `shotdb`
  shotdb::KeepFreedHeapMemory();              // tensors churn every layer (util/heap_env.h)
#else
  if (const char* command = ModelCommandIn(argc, argv)) {
    const std::string helper = ModelHelperPath();
    if (!helper.empty() && ::access(helper.c_str(), X_OK) == 0) {
      shotdb::SetPassiveOpenMpWait();  // read by libgomp when shotdb-model loads
                                       // (util/openmp_env.h)
      ::execv(helper.c_str(), argv);
      std::cerr << "shotdb " << command << ": cannot run " << helper << ": " << std::strerror(errno)
                << '\n';
      return 1;
    }
    std::cerr << "shotdb " << command
              << ": this shotdb was built without the model runtime (libtorch); the model "
                 "commands need `shotdb-model` next to it (configure with SHOTDB_WITH_TORCH=ON)\n";
    return kUsageError;
  }
#endif

  CLI::App app{"shotdb: a persistent KV-cache store for many-shot in-context learning"};
  app.name("shotdb");
  app.require_subcommand(1);
  app.fallthrough();  // --store may also be given after the subcommand name

  GlobalOptions global;
  const char* env_store = std::getenv("SHOTDB_STORE");
  global.store_dir = env_store != nullptr && *env_store != '\0' ? env_store : "./shotdb-store";
  app.add_option("--store", global.store_dir,
                 "Store directory (default: $SHOTDB_STORE or ./shotdb-store)")
      ->capture_default_str();

  shotdb::cli::RegisterInspectCommands(app, global);
#ifdef SHOTDB_MODEL_COMMANDS
  shotdb::cli::RegisterModelCommands(app, global);
#else
  // Listed in --help; a command line naming one never gets here (see above).
  for (const auto& command : kModelCommands) app.add_subcommand(command[0], command[1]);
#endif

  try {
    app.parse(argc, argv);
  } catch (const CLI::CallForHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForAllHelp& e) {
    return app.exit(e);
  } catch (const CLI::CallForVersion& e) {
    return app.exit(e);
  } catch (const CLI::RuntimeError& e) {
    return e.get_exit_code();  // a command's own failure, already reported
  } catch (const CLI::ParseError& e) {
    std::cerr << "shotdb: " << e.what() << " (see shotdb --help)\n";
    return kUsageError;
  } catch (const std::exception& e) {
    // Library calls return Status; this catches what the C++ runtime itself throws (bad_alloc).
    std::cerr << "shotdb: " << e.what() << '\n';
    return 1;
  }
  return 0;
}
