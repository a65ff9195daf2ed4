#include "support/support.hpp"

#include <dirent.h>
#include <fcntl.h>
#include <ftw.h>
#include <signal.h>
#include <stdlib.h>
#include <sys/wait.h>

#include <filesystem>
#include <fstream>
#include <iterator>
#include <stdexcept>

namespace qbtest {

std::size_t open_fd_count() {
  DIR* dir = ::opendir("/proc/self/fd");
  if (dir == nullptr) throw std::runtime_error("cannot open /proc/self/fd");
  std::size_t n = 0;
  while (dirent* e = ::readdir(dir)) {
    if (e->d_name[0] != '.') ++n;
  }
  ::closedir(dir);
  return n - 1;  // the directory stream's own fd
}

int fds_on(pid_t pid, const std::string& path) {
  int n = 0;
  std::error_code ec;
  for (const auto& e :
       std::filesystem::directory_iterator("/proc/" + std::to_string(pid) + "/fd", ec)) {
    std::error_code lec;
    if (std::filesystem::read_symlink(e.path(), lec) == path) ++n;
  }
  return n;
}

std::vector<std::string> cmdline_words(pid_t pid) {
  std::ifstream in("/proc/" + std::to_string(pid) + "/cmdline", std::ios::binary);
  const std::string all((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  std::vector<std::string> words;
  for (std::size_t at = 0; at < all.size();) {
    const auto end = all.find('\0', at);
    words.push_back(all.substr(at, end - at));
    at = end == std::string::npos ? all.size() : end + 1;
  }
  return words;
}

TempDir::TempDir() {
  char tmpl[] = "/tmp/qbtest.XXXXXX";
  if (::mkdtemp(tmpl) == nullptr) throw std::runtime_error("mkdtemp failed");
  path_ = tmpl;
}

TempDir::~TempDir() {
  ::nftw(
      path_.c_str(),
      [](const char* p, const struct stat*, int, struct FTW*) { return ::remove(p); }, 16,
      FTW_DEPTH | FTW_PHYS);
}

void write_file(const std::string& path, const std::string& content) {
  int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  if (fd < 0) throw std::runtime_error("cannot create " + path);
  std::size_t off = 0;
  while (off < content.size()) {
    ssize_t n = ::write(fd, content.data() + off, content.size() - off);
    if (n <= 0) {
      ::close(fd);
      throw std::runtime_error("cannot write " + path);
    }
    off += static_cast<std::size_t>(n);
  }
  ::close(fd);
}

ChildGuard::~ChildGuard() {
  if (pid_ <= 0) return;
  ::kill(pid_, SIGKILL);
  ::waitpid(pid_, nullptr, 0);
}

pid_t fork_as_uid(uid_t uid) {
  int ready[2];
  if (::pipe2(ready, O_CLOEXEC) != 0) return -1;
  pid_t pid = ::fork();
  if (pid == 0) {
    if (::setresgid(uid, uid, uid) != 0 || ::setresuid(uid, uid, uid) != 0) ::_exit(99);
    char one = 1;
    if (::write(ready[1], &one, 1) != 1) ::_exit(98);
    for (;;) ::pause();
  }
  ::close(ready[1]);
  char got = 0;
  ssize_t n = pid > 0 ? ::read(ready[0], &got, 1) : -1;
  ::close(ready[0]);
  if (pid > 0 && n != 1) {
    ::waitpid(pid, nullptr, 0);
    return -1;
  }
  return pid;
}

namespace {

void openssl(const std::string& args) {
  const std::string cmd = "openssl " + args + " >/dev/null 2>&1";
  INFO(cmd);
  REQUIRE(std::system(cmd.c_str()) == 0);
}

}  // namespace

TestCerts::TestCerts(const TempDir& dir, const std::string& tag) {
  const std::string d = dir.path() + "/" + tag;
  std::filesystem::create_directory(d);
  ca = d + "/ca.pem";
  cert = d + "/broker.pem";
  key = d + "/broker.key";
  const std::string ec = "-newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes";
  openssl("req -x509 " + ec + " -days 2 -subj /CN=" + tag + "-ca -keyout " + d + "/ca.key -out " +
          ca);
  openssl("req " + ec + " -subj /CN=localhost -keyout " + key + " -out " + d + "/broker.csr");
  write_file(d + "/ext", "subjectAltName=IP:127.0.0.1,DNS:localhost\n");
  openssl("x509 -req -in " + d + "/broker.csr -CA " + ca + " -CAkey " + d +
          "/ca.key -CAcreateserial -days 2 -extfile " + d + "/ext -out " + cert);
}

std::vector<std::string> TestCerts::args() const {
  return {"--migration-cert", cert, "--migration-key", key, "--migration-ca", ca};
}

}  // namespace qbtest
