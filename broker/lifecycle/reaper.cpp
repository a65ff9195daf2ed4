#include "broker/lifecycle/reaper.hpp"

#include <sched.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <mutex>
#include <thread>

#include "broker/lifecycle/errc.hpp"
#include "broker/lifecycle/proc.hpp"
#include "fdpass/unique_fd.hpp"

namespace broker::lifecycle {

namespace {

struct KillArgs {
  uid_t reaper_uid;
  uid_t uid;
};

// Runs in a child that shares the broker's memory (CLONE_VM | CLONE_VFORK: no page-table copy,
// the parent sleeps until it exits). Raw syscalls only: glibc's setresuid() would broadcast the
// change to the parent's threads, since they share its memory.
int kill_child(void* arg) {
  const auto* a = static_cast<const KillArgs*>(arg);
  if (::syscall(SYS_setresuid, a->reaper_uid, a->uid, 0) != 0) return 100 + (errno & 0x3f);
  if (::syscall(SYS_kill, -1, SIGKILL) != 0 && errno != ESRCH) return 100 + (errno & 0x3f);
  return 0;
}

}  // namespace

std::error_code ForkingUidKiller::kill_all(uid_t reaper_uid, uid_t uid) {
  if (uid == 0 || reaper_uid == 0 || reaper_uid == uid) return make_error_code(errc::kill_failed);
  // One reaper child at a time: every one runs with the reaper's real uid, and kill(-1) reaches
  // every process whose real uid is the sender's real or effective uid, so two children at once
  // would kill each other (libxl's reaper lock exists for the same reason).
  static std::mutex one_at_a_time;
  std::lock_guard lock(one_at_a_time);
  KillArgs args{reaper_uid, uid};
  alignas(16) static thread_local char stack[16 * 1024];
  pid_t child = ::clone(kill_child, stack + sizeof(stack), CLONE_VM | CLONE_VFORK | SIGCHLD, &args);
  if (child < 0) return {errno, std::system_category()};
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

std::error_code UidKiller::kill_holder(const std::string&, pid_t, uid_t) {
  return make_error_code(errc::kill_failed);
}

std::error_code ForkingUidKiller::kill_holder(const std::string& proc_root, pid_t pid, uid_t uid) {
  // The pidfd first: from here on it names this process and no later one with the same pid.
  fdpass::UniqueFd pidfd(static_cast<int>(::syscall(SYS_pidfd_open, pid, 0)));
  if (!pidfd) return errno == ESRCH ? std::error_code() : std::error_code(errno, std::system_category());
  // Then its uids. While the pinned process lives the pid is its own, so this reads it; if it
  // has died, the signal below finds nothing (ESRCH), whoever holds the pid now.
  auto now = process_of_uid(proc_root, pid, uid);
  if (!now || now->zombie) return {};
  if (::syscall(SYS_pidfd_send_signal, pidfd.get(), SIGKILL, nullptr, 0) != 0 && errno != ESRCH) {
    return {errno, std::system_category()};
  }
  return {};
}

namespace {

// kill(-1) as a uid reaches a process only when the uid is its real or saved uid (kill(2)). One
// that merely runs with it as its effective or filesystem uid (setresuid(other, uid, other)) is
// out of reach, and no further round changes that.
bool reachable(const ProcInfo& p, uid_t uid) {
  unsigned long real = 0, effective = 0, saved = 0;
  if (std::sscanf(p.uids.c_str(), "%lu %lu %lu", &real, &effective, &saved) != 3) return true;
  return real == uid || saved == uid;
}

std::string describe(const ProcInfo& p) {
  return std::to_string(p.pid) + " (state " + p.state + ", uids " + p.uids +
         (p.kill_pending ? ", SIGKILL pending)" : ")");
}

}  // namespace

Result<KillReport> Reaper::kill_uid(uid_t uid, bool round_sent) {
  const auto start = std::chrono::steady_clock::now();
  KillReport report;
  report.uid = uid;
  report.method = "uid";
  report.rounds = round_sent ? 1 : 0;
  const auto deadline = start + settle_;
  bool kill_again = !round_sent;
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
    // The first scan after the first round still sees every victim (dying, or a zombie).
    if (report.rounds == 1 && report.found == 0) report.found = procs.size();
    report.survivors = 0;
    kill_again = false;
    std::string alive;  // the first few survivors, for the error
    for (const auto& p : procs) {
      if (p.zombie) continue;
      ++report.survivors;
      if (report.survivors <= 4) alive += " " + describe(p);
      if (reachable(p, uid)) {
        kill_again = kill_again || !p.kill_pending;
        continue;
      }
      // The last step: what kill(-1) cannot reach, by pid, found by this verified scan.
      if (p.kill_pending) continue;
      if (auto ec = killer_.kill_holder(proc_root_, p.pid, uid)) {
        Error e(make_error_code(errc::survivors),
                "process " + describe(p) + " runs as uid " + std::to_string(uid) +
                    " but kill(-1) as that uid cannot reach it (it is not its real or saved "
                    "uid), and the kill by pid failed: " + ec.message() + "; the uid stays in use");
        return e;
      }
      ++report.by_pid;
    }
    if (report.survivors == 0) {
      report.duration = std::chrono::duration_cast<std::chrono::microseconds>(
          std::chrono::steady_clock::now() - start);
      return report;
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      Error e(make_error_code(errc::survivors),
              std::to_string(report.survivors) + " processes of uid " + std::to_string(uid) +
                  " still alive after " + std::to_string(report.rounds) + " kill rounds:" + alive);
      return e;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(1));
  }
}

}  // namespace broker::lifecycle
