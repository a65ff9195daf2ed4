// qbrokerd: parses the flags and hands over to the composition root (broker/daemon/daemon.cpp).
#include <cstdio>
#include <string_view>
#include <vector>

#include "broker/api/router.hpp"
#include "broker/daemon/daemon.hpp"
#include "broker/daemon/manual.hpp"
#include "broker/daemon/options.hpp"

int main(int argc, char** argv) {
  std::vector<std::string_view> args(argv + 1, argv + argc);
  auto config = broker::daemon::parse_config(args);
  if (!config) {
    std::fprintf(stderr, "qbrokerd: %s\n", config.error().message.c_str());
    return 2;
  }
  if (!config->help_man.empty()) {
    auto section = broker::daemon::man_section(config->help_man);
    if (!section) {
      std::fprintf(stderr, "qbrokerd: --help-man: options or config\n");
      return 2;
    }
    std::fputs(section->c_str(), stdout);
    return 0;
  }
  if (config->help) {
    std::fputs(broker::daemon::usage().c_str(), stdout);
    return 0;
  }
  if (config->version) {
    std::printf("qbrokerd %s\n", std::string(broker::api::kBrokerVersion).c_str());
    return 0;
  }
  return broker::daemon::run(*config);
}
