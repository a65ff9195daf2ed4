#include "qemu_process.hpp"

#include <fcntl.h>
#include <linux/close_range.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdlib>
#include <stdexcept>

#include "fdpass/devices.hpp"

namespace qbtest {

std::string qemu_accel() {
  int fd = ::open("/dev/kvm", O_RDWR | O_CLOEXEC);
  if (fd < 0) return "tcg";
  ::close(fd);
  return "kvm";
}

std::unique_ptr<QemuProcess> QemuProcess::start(int monitors,
                                                const std::vector<std::string>& extra) {
  std::vector<fdpass::UniqueFd> child;
  std::vector<fdpass::UniqueFd> ours;
  std::vector<std::string> args;
  for (int i = 0; i < monitors; ++i) {
    auto pair = fdpass::make_socketpair(SOCK_STREAM);
    if (!pair) throw std::runtime_error("socketpair: " + pair.error().message());
    std::string id = "mon" + std::to_string(i);
    args.insert(args.end(),
                {"-chardev",
                 "socket,id=" + id + ",fd=" + std::to_string(pair->second.get()) + ",server=off",
                 "-mon", "chardev=" + id + ",mode=control"});
    ours.push_back(std::move(pair->first));
    child.push_back(std::move(pair->second));
  }
  args.insert(args.end(), extra.begin(), extra.end());
  auto p = spawn(std::move(child), std::move(args));
  p->monitors = std::move(ours);
  return p;
}

std::unique_ptr<QemuProcess> QemuProcess::start_listening(fdpass::UniqueFd listener,
                                                          const std::vector<std::string>& extra) {
  std::vector<std::string> args = {
      "-chardev", "socket,id=mon0,fd=" + std::to_string(listener.get()) + ",server=on,wait=off",
      "-mon", "chardev=mon0,mode=control"};
  args.insert(args.end(), extra.begin(), extra.end());
  std::vector<fdpass::UniqueFd> child;
  child.push_back(std::move(listener));
  return spawn(std::move(child), std::move(args));
}

std::unique_ptr<QemuProcess> QemuProcess::spawn(std::vector<fdpass::UniqueFd> child_fds,
                                                std::vector<std::string> extra) {
  std::vector<std::string> args = {qemu_binary(), "-machine",        "none",
                                   "-nodefaults", "-no-user-config", "-display",
                                   "none",        "-accel",          qemu_accel()};
  args.insert(args.end(), extra.begin(), extra.end());
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  std::vector<int> keep;
  for (auto& f : child_fds) keep.push_back(f.get());

  const pid_t parent = ::getpid();
  pid_t pid = ::fork();
  if (pid < 0) throw std::runtime_error("fork failed");
  if (pid == 0) {
    // Only async-signal-safe calls from here to exec. QEMU dies with the test, even when the
    // test crashes, so it never outlives it holding ctest's output pipe.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    ::syscall(SYS_close_range, 3u, ~0u, CLOSE_RANGE_CLOEXEC);
    for (int fd : keep) ::fcntl(fd, F_SETFD, 0);
    int devnull = ::open("/dev/null", O_RDONLY);
    if (devnull >= 0) ::dup2(devnull, 0);
    ::execv(argv[0], argv.data());
    ::_exit(127);
  }
  auto p = std::unique_ptr<QemuProcess>(new QemuProcess());
  p->pid_ = pid;
  return p;
}

QemuProcess::~QemuProcess() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  int status = 0;
  while (::waitpid(pid_, &status, 0) < 0 && errno == EINTR) {
  }
}

}  // namespace qbtest
