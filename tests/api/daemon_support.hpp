// qbrokerd and qbrokerctl driven as programs, for the daemon tests and the kill harness: spawning
// and killing the daemon, calling it, and looking at what a QEMU it started holds.
#pragma once

#include <sys/types.h>

#include <chrono>
#include <string>
#include <thread>
#include <vector>

#include <boost/json/value.hpp>

#include "support/support.hpp"

namespace qbtest::daemon {

using Clock = std::chrono::steady_clock;
using namespace std::chrono_literals;

// A child process killed and reaped when the test lets go of it.
struct Child {
  pid_t pid = -1;
  // The exit status (128 + signal for a signal), or -1 when it did not end within `timeout`.
  int wait(std::chrono::milliseconds timeout);
  ~Child();
};

// fork + exec with stdout/stderr to `log`; `listen_fd` becomes fd 3 with LISTEN_FDS/LISTEN_PID.
pid_t spawn(const std::vector<std::string>& argv, const std::string& log, int listen_fd = -1,
            const std::vector<std::string>& env = {});

struct Run {
  int status = -1;
  std::string out;
  std::string err;
};

// qbrokerctl --socket `socket` `args`...
Run ctl(const std::string& socket, std::vector<std::string> args);

// True once GET /v1/version answers 200 on `path`.
bool wait_for_socket(const std::string& path, std::chrono::milliseconds timeout);

// True once the daemon on `sock` lists no domain as adopting: every domain read back from its
// record after a restart has been adopted, found unresponsive or torn down.
bool wait_adopted(const std::string& sock, std::chrono::milliseconds timeout);

std::string slurp(const std::string& path);

// qbrokerd makes a cgroup subtree per uid range; the test's range is its own, so it goes too,
// with any domain cgroup whose removal the daemon had to defer.
void remove_cgroup_base(uid_t base);

// qbrokerd with state and run directories under `dir`, the uid range [base, base + 8) and the
// test guest's directory as image root.
std::vector<std::string> daemon_args(const TempDir& dir, uid_t base, unsigned uids = 8);

// Polls `pred` every 10 ms until it holds or `timeout` passes; its last answer.
bool wait_for(auto pred, std::chrono::milliseconds timeout) {
  auto deadline = Clock::now() + timeout;
  while (Clock::now() < deadline) {
    if (pred()) return true;
    std::this_thread::sleep_for(10ms);
  }
  return pred();
}

// The "return" of a QMP command through the API's passthrough; the test fails on any error.
boost::json::value qmp_over_http(const std::string& sock, const std::string& name,
                                 const std::string& cmd);

// The fds of `pid` that are not sockets: what a flow could leak (images, pipes, event fds),
// without the API connections that come and go.
std::size_t non_socket_fds(pid_t pid);

// The fds of `pid` whose target contains `needle`.
int fds_naming(pid_t pid, const std::string& needle);

// A daemon with an image root of its own and a booted guest domain, for the tests that kill the
// daemon mid-job. This process is the QEMU's subreaper once its daemon dies.
struct KilledDaemon {
  TempDir dir;
  uid_t base;
  std::string images = dir / "images";
  std::string sock = dir / "qbroker.sock";
  std::string name;
  std::string record;  // the domain's record, where a job is journaled
  std::vector<std::string> args;
  pid_t qemu = 0;
  uid_t uid = 0;

  KilledDaemon(uid_t uid_base, const std::string& prefix);
  std::string disk_json() const;
  // The body of a create of the guest domain, with `extra` members.
  std::string create_body(const std::string& extra = {}) const;
  // Creates the guest domain (`extra`: more members of the create body) on a running daemon.
  void create(const std::string& extra = {});
  // Waits until `job` is journaled in the record, gives the flow a moment to send its first
  // command to the (stopped) QEMU, and SIGKILLs the daemon.
  void kill_during(Child& daemon, const std::string& job);
  // QEMU holds nothing of disk d0: no fdset, no block node, no fd of the image.
  void check_no_trace_of_d0();
  // Destroys the domain through `daemon` and checks that nothing of it is left, then stops it.
  void destroy_and_stop(Child& daemon);
};

}  // namespace qbtest::daemon
