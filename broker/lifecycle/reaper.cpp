#include "broker/lifecycle/reaper.hpp"

#include <signal.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <thread>

#include "broker/lifecycle/errc.hpp"
#include "broker/lifecycle/proc.hpp"

namespace broker::lifecycle {

std::error_code ForkingUidKiller::kill_all(uid_t reaper_uid, uid_t uid) {
  if (uid == 0 || reaper_uid == 0 || reaper_uid == uid) return make_error_code(errc::kill_failed);
  pid_t child = ::fork();
  if (child < 0) return {errno, std::system_category()};
  if (child == 0) {
    // Only async-signal-safe calls from here on.
    if (::setresuid(reaper_uid, uid, 0) != 0) ::_exit(100 + (errno & 0x3f));
    if (::kill(-1, SIGKILL) != 0 && errno != ESRCH) ::_exit(100 + (errno & 0x3f));
    ::_exit(0);
  }
  int status = 0;
  while (::waitpid(child, &status, 0) < 0) {
    if (errno != EINTR) return {errno, std::system_category()};
  }
  if (WIFEXITED(status) && WEXITSTATUS(status) == 0) return {};
  if (WIFEXITED(status) && WEXITSTATUS(status) >= 100) {
    return {WEXITSTATUS(status) - 100, std::system_category()};
  }
  return make_error_code(errc::kill_failed);
}

Result<KillReport> Reaper::kill_uid(uid_t uid) {
  const auto start = std::chrono::steady_clock::now();
  KillReport report;
  report.uid = uid;
  report.method = "uid";
  report.found = live_processes_of_uid(proc_root_, uid);
  const auto deadline = start + settle_;
  bool kill_again = true;
  for (;;) {
    if (kill_again) {
      ++report.rounds;
      if (auto ec = killer_.kill_all(reaper_uid_, uid)) {
        Error e(make_error_code(errc::kill_failed),
                "kill(-1) as uid " + std::to_string(uid) + ": " + ec.message());
        return e;
      }
    }
    // SIGKILL is delivered asynchronously and a dying process stays visible until its memory is
    // torn down: poll /proc until the uid is empty. Another round is sent only when a live
    // process has no SIGKILL pending (one round stops a fork storm; this is the safety net).
    auto procs = processes_of_uid(proc_root_, uid);
    report.survivors = 0;
    kill_again = false;
    for (const auto& p : procs) {
      if (p.zombie) continue;
      ++report.survivors;
      kill_again = kill_again || !p.kill_pending;
    }
    if (report.survivors == 0) {
      report.duration = std::chrono::duration_cast<std::chrono::microseconds>(
          std::chrono::steady_clock::now() - start);
      return report;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      Error e(make_error_code(errc::survivors),
              std::to_string(report.survivors) + " processes of uid " + std::to_string(uid) +
                  " still alive after " + std::to_string(report.rounds) + " kill rounds");
      return e;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace broker::lifecycle
