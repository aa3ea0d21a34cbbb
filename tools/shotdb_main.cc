// shotdb: the command-line interface to a shotdb store (docs/cli.md).
#include <CLI/CLI.hpp>
#include <cstdlib>
#include <exception>
#include <iostream>

#include "tools/commands.h"

namespace shotdb::cli {

void SetAction(CLI::App* sub, std::function<int()> action) {
  sub->callback([action = std::move(action)] {
    const int rc = action();
    if (rc != 0) throw CLI::RuntimeError(rc);
  });
}

}  // namespace shotdb::cli

int main(int argc, char** argv) {
  using shotdb::cli::GlobalOptions;
  constexpr int kUsageError = 2;

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
#ifdef SHOTDB_HAVE_TORCH
  shotdb::cli::RegisterModelCommands(app, global);
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
