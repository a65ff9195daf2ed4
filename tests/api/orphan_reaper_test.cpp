// qbrokerd's orphan reaper: reaps zombie children nobody waits for, and never steals a child
// that someone else waits for by pid (the Launcher's QEMUs, the uid killer's children).
#include "broker/daemon/orphan_reaper.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fstream>
#include <thread>

#include "support/support.hpp"

using namespace std::chrono_literals;

namespace {

pid_t exiting_child() {
  pid_t pid = ::fork();
  if (pid == 0) ::_exit(0);
  return pid;
}

bool is_zombie(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/stat");
  std::string stat;
  std::getline(in, stat);
  auto paren = stat.rfind(')');
  return paren != std::string::npos && stat.size() > paren + 2 && stat[paren + 2] == 'Z';
}

void wait_zombie(pid_t pid) {
  for (int i = 0; i < 500 && !is_zombie(pid); ++i) std::this_thread::sleep_for(2ms);
  REQUIRE(is_zombie(pid));
}

}  // namespace

TEST_CASE("the orphan reaper reaps only zombies seen twice and never one it is told to keep",
          "[api][daemon][reaper]") {
  broker::daemon::OrphanReaper reaper;
  pid_t orphan = exiting_child();
  pid_t kept = exiting_child();
  wait_zombie(orphan);
  wait_zombie(kept);

  CHECK(reaper.sweep({kept}) == 0);  // first sight: someone may be about to wait for it
  CHECK(is_zombie(orphan));
  CHECK(reaper.sweep({kept}) == 1);  // still a zombie a sweep later: nobody will
  CHECK_FALSE(is_zombie(orphan));
  CHECK(is_zombie(kept));
  // The kept child is still there for its owner.
  int status = 0;
  CHECK(::waitpid(kept, &status, 0) == kept);

  // A child its owner reaps between two sweeps is simply gone; nothing fails.
  pid_t owned = exiting_child();
  wait_zombie(owned);
  CHECK(reaper.sweep({}) == 0);
  CHECK(::waitpid(owned, &status, 0) == owned);
  CHECK(reaper.sweep({}) == 0);
  // With no zombie child at all, a sweep is one waitid() and reaps nothing.
  CHECK(reaper.sweep({}) == 0);
}
